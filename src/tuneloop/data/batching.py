"""Batches that waste no compute on padding: examples of similar length share a batch.

Each example keeps its own row, so no example can attend to another (unlike packing without
a block-diagonal mask); grouping by length keeps the padding near zero all the same.
"""

from __future__ import annotations

import random

import torch

from tuneloop.data.tokenize import IGNORE, Encoded


def length_grouped_batches(lengths: list[int], batch_tokens: int, seed: int,
                           max_batch: int = 64) -> list[list[int]]:
    """Index batches whose padded size (rows x longest row) stays within `batch_tokens`.

    Examples are shuffled, then sorted by length inside windows of a few hundred, so batches
    are homogeneous in length but their order and composition still vary with the seed.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 256
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batch: list[int] = []
        for i in chunk:
            longest = max([lengths[j] for j in batch] + [lengths[i]])
            if batch and (longest * (len(batch) + 1) > batch_tokens or len(batch) >= max_batch):
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def collate(items: list[Encoded], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples into input_ids / attention_mask / labels tensors."""
    width = max(len(it) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        ids[row, cols] = torch.tensor(it.input_ids)
        labels[row, cols] = torch.tensor(it.labels)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padded_batches(items: list[Encoded], pad_id: int, batch_tokens: int = 2048,
                   seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`items` collated into length-grouped batches of at most `batch_tokens` padded tokens
    (an example longer than that alone): for loss and KL passes over a fixed set."""
    return [collate([items[i] for i in b], pad_id)
            for b in length_grouped_batches([len(x) for x in items], batch_tokens, seed=seed)]
