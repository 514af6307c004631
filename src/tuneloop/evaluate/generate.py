"""Batched greedy generation for evaluation: similar-length prompts share a left-padded batch."""

from __future__ import annotations

import torch

from tuneloop.data.batching import collate, length_grouped_batches
from tuneloop.data.tokenize import Encoded, prompt_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int,
             batch_tokens: int = 2048, on_batch=None) -> tuple[list[str], list[int]]:
    """Greedy replies to chat prompts, in input order, and the number of tokens each generated."""
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    lengths = [len(e) for e in encoded]
    budget = max(batch_tokens, max(lengths) + max_new_tokens)
    batches = length_grouped_batches([n + max_new_tokens for n in lengths], budget, seed=0)
    replies: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    model.eval()
    for idx in batches:
        batch = collate([Encoded(encoded[i], encoded[i]) for i in idx], tokenizer.pad_token_id,
                        left_pad=True)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
            counts[i] = len(tokens)
            replies[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        if on_batch:
            on_batch(len(idx))
    return replies, counts
