"""
Sample text from a GPT-2: a checkpoint of train_gpt2.py, OpenAI's GPT-2 or a transformers folder, all run as
the trainer's GPT (train_gpt2.load_start builds it, as --init_from does), so any model the trainer trains samples.

    python sample.py --init_from out/best_val_loss.pt --start "Hello, I'm a language model,"
    python sample.py --init_from out/best_val_loss.pt --start FILE:prompt.txt --num_samples 2 --max_new_tokens 200
    python sample.py --init_from gpt2 --device cuda --dtype bfloat16 --temperature 0.8 --top_k 50 --seed 42

Every flag is a field of SampleConfig below; `python sample.py --help` lists them with their defaults. The text
is printed as it is generated, one sample after another; the same seed prints the same text.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import UserError, build_parser, flag, run_command, shown_path
from device import check_dtype, make_autocast, resolve_device, resolve_dtype, warn_if_cpu_busy
from fineweb import check_vocab_size
from sampling import generate_tokens
from train_gpt2 import load_start, start_tokenizer

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class SampleConfig:
    init_from: str = flag("out-shakespeare/best_val_loss.pt", "a checkpoint of train_gpt2.py (the quick start's by "
                          "default), gpt2 (or gpt2-medium, gpt2-large, gpt2-xl) or a transformers folder", path=True)
    start: str = flag("", "the prompt, or FILE:path to read it from a file; empty starts a new document")
    num_samples: int = flag(4, "samples to draw, one after another")
    max_new_tokens: int = flag(100, "tokens to generate for each sample")
    temperature: float = flag(0.8, "divides the logits: below 1 is more predictable, above 1 more random")
    top_k: int = flag(50, "sample from the k likeliest tokens only (0: from all of them)")
    seed: int = flag(42, "seeds the sampling")
    device: str = flag("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'")
    dtype: str = flag("auto", "'auto' (as train_gpt2.py's), 'bfloat16', 'float16' or 'float32'")

    def validate(self):
        """Raise UserError naming the problem and the fix; called before any work is done."""
        if self.num_samples <= 0:
            raise UserError(f"--num_samples must be a positive integer, got {self.num_samples}")
        if self.max_new_tokens < 0 or self.top_k < 0 or self.temperature < 0:
            raise UserError("--max_new_tokens, --top_k and --temperature must be 0 or more")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be from 0 to 2**63 - 1, got {self.seed}")
        check_dtype(self.dtype)


MAX_PROMPT_CHARS = 10**6  # far past any model's context: a longer file is no prompt (/dev/zero, say)


def read_prompt(start):
    """--start: the prompt itself, or FILE:path, of which at most MAX_PROMPT_CHARS + 1 characters are read."""
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):])
    try:
        with open(path, encoding="utf-8") as f:
            prompt = f.read(MAX_PROMPT_CHARS + 1)
    except OSError as e:
        raise UserError(f"--start FILE:{shown_path(path)}: cannot read it ({e.strerror}): pass an existing text "
                        "file") from None
    except UnicodeDecodeError:
        raise UserError(f"--start {start}: {path} is not UTF-8 text") from None
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"--start {start}: {path} is longer than {MAX_PROMPT_CHARS:,} characters, too long for a "
                        "prompt: pass a shorter text file")
    return prompt


# -----------------------------------------------------------------------------
# Sampling, streamed


def text_pieces(tokenizer, ids):
    """The text of ids (an iterable, drawn one at a time) in pieces, each as soon as it is whole, which
    together are tokenizer.decode of them all. Each step decodes a few tokens, not all so far: those not
    yet written, after the ones written last (a decoder may write a token otherwise at the start of a
    text: without its leading space, say), and the piece is what the new tokens add to those. A token can
    end inside a character's UTF-8 bytes: then the text ends in U+FFFD and waits for the next token."""
    ids_so_far, start, written = [], 0, 0  # ids_so_far[start:written] were written last; the rest not yet
    for token in ids:
        ids_so_far.append(token)
        before, text = tokenizer.decode(ids_so_far[start:written]), tokenizer.decode(ids_so_far[start:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            yield text[len(before):]
            start, written = written, len(ids_so_far)
    rest = tokenizer.decode(ids_so_far[start:])[len(tokenizer.decode(ids_so_far[start:written])):]
    if rest:  # an incomplete character at the very end: its replacement character, as decode gives it
        yield rest


def stream_sample(model, tokenizer, prompt, config, device, autocast, generator, out):
    """Write prompt and then the sampled tokens' text to out as soon as it is whole; return the new ids."""
    ids = tokenizer.encode_prompt(prompt) or [tokenizer.eot]  # no prompt: start a document, as in training
    out.write(prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    new_ids = []

    def drawn():
        for token in generate_tokens(lambda context: model(context)[0], idx, config.max_new_tokens,
                                     model.config.block_size, config.temperature, config.top_k or None,
                                     vocab_limit=tokenizer.n_vocab, generator=generator):
            new_ids.append(token.item())
            yield new_ids[-1]
    with autocast:
        for piece in text_pieces(tokenizer, drawn()):
            out.write(piece)
            out.flush()
    return new_ids


def sample(config, out=sys.stdout):
    prompt = read_prompt(config.start)  # before the model is loaded: a missing file fails fast
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    warn_if_cpu_busy(device)
    model, checkpoint = load_start(config.init_from, ".")
    tokenizer = start_tokenizer(config.init_from, checkpoint)  # the run's, or a transformers folder's own
    check_vocab_size(model.config.vocab_size, config.init_from, tokenizer)  # the tokenizer's ids must index it
    model = model.to(device)
    autocast = make_autocast(device.split(":")[0], dtype)
    generator = torch.Generator(device=device).manual_seed(config.seed)  # one stream for all the samples
    for _ in range(config.num_samples):
        try:
            stream_sample(model, tokenizer, prompt, config, device, autocast, generator, out)
        except FloatingPointError as e:  # finite weights so large that their logits are not
            raise UserError(f"--init_from {config.init_from}: {e}; sample an earlier checkpoint of the run") from None
        out.write("\n---------------\n")
        out.flush()


# -----------------------------------------------------------------------------
# Entry point


def main(argv=None):
    def command():
        args = build_parser(SampleConfig, __doc__.strip().split("\n\n")[0]).parse_args(argv)  # the first paragraph
        config = SampleConfig(**vars(args))
        config.validate()
        sys.stdout.reconfigure(errors="replace")  # a console that cannot show a character shows '?' instead
        sample(config)
    run_command(command)


if __name__ == "__main__":
    main()
