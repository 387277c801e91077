"""
What the trainer scores at every evaluation: the val loss over fixed batches, and in bits per byte of the
text they decode to (a figure that runs with different tokenizers share), zero-shot HellaSwag
(hellaswag.py), and a few samples printed to see. It is handed the model and its tokenizer; under several
processes each rank scores its share and every rank returns the figures for all of them.

    evaluation = Evaluation(config, block_size, dist_info, log, tokenizer)  # the val batches, HellaSwag's data
    scores = evaluation.scores(model, autocast)                  # {"val_loss": ..., "val_bpb": ..., ...}
"""

import math
import time

import torch

import hellaswag
from cli import UserError
from device import make_autocast, resolve_dtype
from fineweb import check_vocab_size, fingerprint, load_token_sources, read_span
from rundir import RunLog, claim_out_dir

# -----------------------------------------------------------------------------
# The val batches: the same at every evaluation, so that losses compare


def val_batch_positions(sources, batch_size, block_size, eval_iters):
    """The fixed validation batches: [(source index, start)] of the first eval_iters consecutive
    batch_size * block_size + 1 token spans of the val data. The same at every evaluation."""
    span = batch_size * block_size
    positions = []
    for i, (_, tokens) in enumerate(sources):
        for start in range(0, len(tokens) - span, span):
            if len(positions) == eval_iters:
                return positions
            positions.append((i, start))
    if not positions:
        raise UserError(f"the val data ({sum(len(t) for _, t in sources)} tokens) is shorter than "
                        f"one batch ({batch_size} x {block_size} tokens + 1): lower --batch_size "
                        "or --block_size")
    return positions


def val_tokens_per_byte(sources, positions, span, tokenizer):
    """The val batches' targets (span tokens each) per byte of the UTF-8 text they stand for, counted token
    by token (a character that two batches share counts once, whole; end-of-text tokens count none):
    nats per token times this, over ln 2, are bits per byte."""
    targets = [read_span(*sources[i], start + 1, span, tokenizer.n_vocab) for i, start in positions]
    return sum(map(len, targets)) / max(sum(map(tokenizer.text_bytes, targets)), 1)


def bits_per_byte(loss, tokens_per_byte):
    """A loss in nats per token as bits per byte of text (nanochat's figure)."""
    return loss * tokens_per_byte / math.log(2)


# -----------------------------------------------------------------------------
# The evaluations, and the samples


class Evaluation:
    """What every evaluation scores: the fixed val batches (the same each time, so that losses
    compare) and the HellaSwag examples (None when off or unavailable), in the tokenizer's tokens.
    Built before the model, so that bad data fails before any work. Its state in a checkpoint is the
    val data's identity, so that a resumed run refuses val data changed in place, as its loader
    refuses train data."""

    def __init__(self, config, block_size, dist_info, log, tokenizer):
        self.tokenizer = tokenizer
        self.sources = load_token_sources(config.data, "val", tokenizer)
        self.positions = val_batch_positions(self.sources, config.batch_size, block_size,
                                             config.eval_iters)
        self.tokens_per_byte = val_tokens_per_byte(self.sources, self.positions,
                                                   config.batch_size * block_size, tokenizer)
        self.batch_size, self.block_size, self.dist_info = config.batch_size, block_size, dist_info
        self.config, self.log = config, log
        self.hellaswag = hellaswag.load_for_training(config, dist_info, log)
        self.fingerprints = None  # taken at the first checkpoint or resume

    def read_fingerprints(self):
        """The fingerprint of each val source the val batches read (None for the others: their
        tokens are never scored), taken once a process (fineweb.fingerprint: 0.5 s per 100M
        tokens)."""
        if self.fingerprints is None:
            read = {source for source, _ in self.positions}
            self.fingerprints = [fingerprint(tokens) if i in read else None
                                 for i, (_, tokens) in enumerate(self.sources)]
        return self.fingerprints

    def sizes(self):
        return [[name, len(tokens)] for name, tokens in self.sources]

    def state_dict(self):
        return {"sources": self.sizes(), "fingerprints": self.read_fingerprints()}

    def load_state_dict(self, state):
        """Refuse val data that differs from the checkpoint's under the same --data: other sources
        or sizes, or other contents in a source both runs read."""
        if [list(source) for source in state["sources"]] != self.sizes():
            raise UserError("the val data differs from the checkpoint's (source names or sizes "
                            "changed): resume with the same --data")
        now = self.read_fingerprints()
        for (name, _), saved, fingerprint_now in zip(self.sources, state["fingerprints"], now):
            if None not in (saved, fingerprint_now) and saved != fingerprint_now:
                raise UserError(f"the val data has the checkpoint's source names and sizes but "
                                f"other contents ({name} differs from when the run first read it): "
                                "restore the data the run evaluated on, or start a new run")

    def report(self, step, model, generator_model, autocast, tokens):
        """The evaluation at a training step: its scores printed and recorded in metrics.jsonl, and
        the samples printed. model: what the forward passes call (compiled, under DDP);
        generator_model: the GPT itself, for the samples. Returns (scores, seconds it took)."""
        start = time.perf_counter()
        scores = self.scores(model, autocast)  # ends in .item(): the device is done
        seconds = time.perf_counter() - start
        self.log.print(f"step {step}: {describe_scores(scores)} | {seconds:.1f} s")
        self.log.record(step=step, **scores, eval_seconds=round(seconds, 3), tokens=tokens)
        c = self.config
        try:
            for text in sample_text(generator_model, self.dist_info, autocast, c.seed + step,
                                    c.sample_prompt, c.num_samples, tokenizer=self.tokenizer):
                self.log.print(f"  sample: {text!r}")
        except FloatingPointError as e:  # weights that diverged: the checkpoint's save says so
            self.log.print(f"  samples: none ({e})")
        return scores, seconds

    @torch.no_grad()
    def val_loss(self, model, autocast):
        """The mean loss over the fixed val batches, and in bits per byte; rank r takes batches r,
        r + world_size, ... (a lockstep pass past its share, under FSDP, runs the first batch again and
        is not counted)."""
        d, B, T = self.dist_info, self.batch_size, self.block_size
        mine = self.positions[d.rank::d.world_size]
        model.eval()
        loss_sum = torch.zeros(2, device=d.device)  # (sum of batch losses, batch count)
        for i in range(d.forward_passes(len(self.positions))):
            source, start = mine[i] if i < len(mine) else self.positions[0]
            chunk = torch.from_numpy(read_span(*self.sources[source], start, B * T + 1,
                                               self.tokenizer.n_vocab))
            x, y = chunk[:-1].view(B, T).to(d.device), chunk[1:].view(B, T).to(d.device)
            with autocast:
                _, loss = model(x, y, return_logits=False)  # chunked: never the full logits
            counted = torch.tensor(float(i < len(mine)), device=d.device)
            loss_sum += torch.stack([loss.float() * counted, counted])
        model.train()
        loss_sum = d.sum(loss_sum)
        val_loss = (loss_sum[0] / loss_sum[1]).item()
        return {"val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, self.tokens_per_byte)}

    def scores(self, model, autocast):
        """Every evaluation's figures, the same on all ranks: {val_loss, val_bpb, and with HellaSwag
        hellaswag_acc_norm, hellaswag_acc, hellaswag_n}. An evaluation is a method that returns a
        dict of figures, listed here."""
        scores = {}
        for evaluation in (self.val_loss, self.hellaswag_scores):
            scores.update(evaluation(model, autocast))
        return scores

    def hellaswag_scores(self, model, autocast):
        if not self.hellaswag:
            return {}
        # hellaswag.py's own batch, whatever the training batch: its logits at the endings stay near
        # a GB however large the micro-batch
        result = hellaswag.evaluate(model, self.hellaswag, hellaswag.BATCH_SIZE, self.block_size,
                                    autocast, self.dist_info, by_position=True,  # the trainer's GPT
                                    tokenizer=self.tokenizer)
        return {"hellaswag_acc_norm": result["acc_norm"], "hellaswag_acc": result["acc"],
                "hellaswag_n": result["n"]}


def describe_scores(scores, batches=None):
    text = (f"val loss {scores['val_loss']:.4f}" + (f" over {batches} batches" if batches else "")
            + f" | val bpb {scores['val_bpb']:.4f}")
    if "hellaswag_n" in scores:
        text += (f" | hellaswag acc_norm {scores['hellaswag_acc_norm']:.4f} "
                 f"({scores['hellaswag_n']})")
    return text


def sample_text(model, dist_info, autocast, seed, prompt, num_samples=4, max_new_tokens=32, *,
                tokenizer):
    """num_samples continuations of prompt, on rank 0 (on every rank under FSDP, whose forward
    passes every rank makes: the same text), in the model's tokenizer; an empty prompt starts a new
    document."""
    if dist_info.forward_passes(int(num_samples > 0)) == 0:
        return []
    ids = tokenizer.encode_prompt(prompt) or [tokenizer.eot]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dist_info.device)
    generator = torch.Generator(device=dist_info.device).manual_seed(seed)
    model.eval()
    with autocast:
        out = model.generate(idx, max_new_tokens, top_k=50, vocab_limit=tokenizer.n_vocab,
                             generator=generator)
    model.train()
    return [tokenizer.decode(row.tolist()) for row in out]


# -----------------------------------------------------------------------------
# --eval_only: a checkpoint scored as training scores it


def evaluate_only(config, dist_info, model, checkpoint, place, tokenizer):
    """--eval_only: the val loss (and HellaSwag) of the --init_from model, read and written in its
    tokenizer's tokens, recorded in out_dir's metrics.jsonl (the checkpoint's own folder unless --out_dir
    is given). place(model, dtype): the model on its device as the trainer places it (this rank's shards
    under FSDP)."""
    check_vocab_size(model.config.vocab_size,
                     checkpoint["path"] if checkpoint else config.init_from, tokenizer)
    log = RunLog(config.out_dir, dist_info.is_master)
    evaluation = Evaluation(config, model.config.block_size, dist_info, log, tokenizer)
    dtype = resolve_dtype(config.dtype, dist_info.device, dist_info.sharded)
    # its one line goes to a directory no trainer is writing
    lock = dist_info.on_rank0(lambda: claim_out_dir(config.out_dir), "use --out_dir")
    try:
        model = place(model, dtype)
        forward = torch.compile(model) if config.compile else model
        scores = evaluation.scores(forward, make_autocast(dist_info.device.split(":")[0], dtype))
        source, step = ((checkpoint["path"], checkpoint["progress"]["iter_num"]) if checkpoint
                        else (config.init_from, 0))
        log.print(f"{source}: step {step} {describe_scores(scores, len(evaluation.positions))}")
        log.record(step=step, **scores, eval_only=True, checkpoint=str(source))
        log.raise_if_failed(dist_info)
    finally:
        if lock is not None:
            lock.release()
