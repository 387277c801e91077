"""
Drawing text from a language model one token at a time: the context window, the temperature and
top-k. The model is any function from tokens (B, T) to logits (B, T, V): the trainer's GPT (its
samples at each evaluation, GPT.generate) and transformers' GPT-2 (sample.py) draw through the same
code.

    for token in generate_tokens(lambda idx: model(idx)[0], idx, 100, block_size=1024, top_k=50):
        ...  # each (B, 1) batch of ids as soon as it is drawn
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def generate_tokens(logits_of, idx, max_new_tokens, block_size, temperature=1.0, top_k=None,
                    vocab_limit=None, generator=None):
    """Yield max_new_tokens sampled (B, 1) batches of ids after idx (B, T), each as soon as it is
    drawn. The model sees the last block_size tokens; ids at or past vocab_limit (a padded
    vocabulary's extra rows) are never sampled; temperature 0 is the likeliest token (the smallest
    positive temperature). Logits that are not finite (a model whose weights diverged) raise
    FloatingPointError: no token can be drawn from them."""
    for _ in range(max_new_tokens):
        logits = logits_of(idx[:, -block_size:])[:, -1, :vocab_limit].float()
        logits = logits / max(temperature, 1e-6)
        if not bool(torch.isfinite(logits).all()):  # a wait for the device, a token at a time
            raise FloatingPointError("the model's logits are not finite: its weights have diverged")
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat((idx, next_token), dim=1)
        yield next_token
