"""Batched greedy generation for evaluation: similar-length prompts share a left-padded batch."""

from __future__ import annotations

import torch

from tuneloop.core.batching import collate, length_grouped_batches
from tuneloop.core.tokenize import Encoded, prompt_ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int,
             batch_tokens: int = 2048, on_batch=None, temperature: float = 0.0,
             seed: int = 0, grammar=None) -> tuple[list[str], list[int]]:
    """Replies to chat prompts, in input order, and the number of tokens each generated.

    Greedy by default; with a `temperature` each reply is sampled (seeded by `seed`). With an
    xgrammar `grammar`, every reply is held to it token by token.
    """
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    lengths = [len(e) for e in encoded]
    budget = max(batch_tokens, max(lengths) + max_new_tokens)
    batches = length_grouped_batches([n + max_new_tokens for n in lengths], budget, seed=0)
    replies: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    model.eval()
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0 else {"do_sample": False})
    for idx in batches:
        batch = collate([Encoded(encoded[i], encoded[i]) for i in idx], tokenizer.pad_token_id,
                        left_pad=True)
        if temperature > 0:
            torch.manual_seed(seed)
        if grammar is not None:
            sampling["logits_processor"] = _held_to(grammar)
        out = model.generate(input_ids=batch["input_ids"].to(model.device),
                             attention_mask=batch["attention_mask"].to(model.device),
                             max_new_tokens=max_new_tokens, **sampling,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        _collect(tokenizer, out[:, batch["input_ids"].shape[1]:], idx, replies, counts)
        if on_batch:
            on_batch(len(idx))
    return replies, counts


def _held_to(grammar) -> list:
    """The logits processors that hold one generate call's rows to an xgrammar grammar (a
    processor keeps its rows' matchers: a new one per call)."""
    from xgrammar.contrib.hf import LogitsProcessor

    return [LogitsProcessor(grammar)]


def _collect(tokenizer, new: torch.Tensor, idx: list[int], replies: list[str],
             counts: list[int]) -> None:
    """Store each row's generated tokens, cut after end-of-turn, as text and a token count."""
    for row, i in enumerate(idx):
        tokens = new[row].tolist()
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
        counts[i] = len(tokens)
        replies[i] = tokenizer.decode(tokens, skip_special_tokens=True)


@torch.no_grad()
def generate_shared_prefix(model, tokenizer, prefix: list[int], suffixes: list[list[int]],
                           max_new_tokens: int, batch_size: int = 16, reuse: bool = True,
                           on_batch=None, grammar=None) -> tuple[list[str], list[int]]:
    """Greedy replies to prompts that all start with the same `prefix` tokens (each held to an
    xgrammar `grammar` where one is given).

    With `reuse`, the prefix is run through the model once and its KV cache is copied into
    every batch, so a many-shot prompt of thousands of tokens costs one forward pass instead
    of one per test row. Suffixes are left-padded *after* the prefix; generate() derives
    position ids from the attention mask, so every row sees exactly the positions it would
    see alone. `reuse=False` runs the same token sequences without the cache (the reference).
    """
    import copy

    cache = None
    if reuse and prefix:
        cache = model(input_ids=torch.tensor([prefix], device=model.device),
                      use_cache=True).past_key_values
    order = sorted(range(len(suffixes)), key=lambda i: -len(suffixes[i]))
    replies: list[str] = [""] * len(suffixes)
    counts: list[int] = [0] * len(suffixes)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        tail = collate([Encoded(suffixes[i], suffixes[i]) for i in idx], tokenizer.pad_token_id,
                       left_pad=True)
        n = len(idx)
        ids = torch.cat([torch.tensor([prefix], dtype=torch.long).expand(n, -1), tail["input_ids"]],
                        dim=1)
        mask = torch.cat([torch.ones(n, len(prefix), dtype=torch.long), tail["attention_mask"]], dim=1)
        kwargs = {}
        if grammar is not None:
            kwargs["logits_processor"] = _held_to(grammar)
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(n)
            kwargs["past_key_values"] = batch_cache
        ids, mask = ids.to(model.device), mask.to(model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **kwargs)
        _collect(tokenizer, out[:, ids.shape[1]:], idx, replies, counts)
        if on_batch:
            on_batch(n)
    return replies, counts
