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


def update_batches(lengths: list[int], batch_size: int, batch_tokens: int, seed: int,
                   parts: int = 1, max_rows: int = 64) -> list[list[list[int]]]:
    """One pass over the data as optimizer updates of `batch_size` examples, each split into
    micro-batches of at most `batch_tokens` padded tokens (and at least `parts` of them where
    it has the rows, so that `parts` processes each get one).

    Which examples an update holds depends only on the lengths, the batch size and the seed:
    a GPU's larger micro-batch splits an update differently, never changes how many updates
    a run makes or what they hold. Examples are shuffled, sorted by length inside windows of
    16 updates (so an update's rows pad little), cut into updates, and the updates shuffled.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 16 * batch_size
    updates: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        updates += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(updates)
    return [_micro_batches(u, lengths, batch_tokens, parts, max_rows) for u in updates]


def _micro_batches(update: list[int], lengths: list[int], batch_tokens: int, parts: int,
                   max_rows: int) -> list[list[int]]:
    """An update (sorted longest first) cut greedily into micro-batches within the budget."""
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in update:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (longest * (len(batch) + 1) > batch_tokens or len(batch) >= max_rows):
            batches.append(batch)
            batch = []
        batch.append(i)
    batches.append(batch)
    while len(batches) < parts <= len(update):  # halves never exceed their parent's budget
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        b = batches.pop(largest)
        batches[largest:largest] = [b[: len(b) // 2], b[len(b) // 2:]]
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
