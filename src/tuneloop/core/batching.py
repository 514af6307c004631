"""Batches that waste no compute on padding, in one of two layouts.

Padded (`collate`): each example keeps its own row, examples of similar length share a batch,
so the padding stays near zero. Packed (`pack`): examples laid end to end in rows of up to
`row_tokens`, position ids restarting at each example and no attention mask, from which
transformers masks attention to each example's own tokens (sdpa, eager and flex attention
build a block-diagonal causal mask; FlashAttention runs variable-length kernels): fewer,
fuller kernel launches, which is what a GPU step is bound by at these model sizes.
"""

from __future__ import annotations

import random

import torch

from tuneloop.core.tokenize import IGNORE, Encoded


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
                   parts: int = 1, max_rows: int = 64, packed: bool = False
                   ) -> list[list[list[int]]]:
    """One pass over the data as optimizer updates of `batch_size` examples, each split into
    micro-batches of at most `batch_tokens` padded tokens (and at least `parts` of them where
    it has the rows, so that `parts` processes each get one).

    Which examples an update holds depends only on the lengths, the batch size and the seed:
    a GPU's larger micro-batch splits an update differently, never changes how many updates
    a run makes or what they hold. Examples are shuffled, sorted by length inside windows of
    16 updates (so an update's rows pad little), cut into updates, and the updates shuffled.
    `packed` micro-batches are held to `batch_tokens` real tokens (`pack` lays them out)
    instead of rows x their longest, and to no count of rows.
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
    return [_micro_batches(u, lengths, batch_tokens, parts, max_rows, packed) for u in updates]


def _micro_batches(update: list[int], lengths: list[int], batch_tokens: int, parts: int,
                   max_rows: int, packed: bool = False) -> list[list[int]]:
    """An update (sorted longest first) cut greedily into micro-batches within the budget."""
    batches: list[list[int]] = []
    batch: list[int] = []
    held = 0  # packed: the real tokens in `batch`
    for i in update:
        longest = lengths[batch[0]] if batch else lengths[i]
        full = (held + lengths[i] > batch_tokens if packed else
                longest * (len(batch) + 1) > batch_tokens or len(batch) >= max_rows)
        if batch and full:
            batches.append(batch)
            batch, held = [], 0
        batch.append(i)
        held += lengths[i]
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


def pack(items: list[Encoded], pad_id: int, row_tokens: int) -> dict[str, torch.Tensor]:
    """Examples laid end to end in rows of at most `row_tokens` (first fit, longest first; an
    example longer than that has a row of its own), for a model that masks attention by
    position ids: each example's positions restart at 0, and a row's padding at its end is a
    sequence of its own. An example's first token is never a target, so no loss crosses from
    one example into the next.

    Beside input_ids, labels and position_ids: attention_mask marks the real tokens (for
    counting; it is not given to the model, which would then ignore the packing) and
    sequence[r, t] is the item the token belongs to (-1: padding), in the order of `items`.
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i]))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        n = len(items[i])
        fit = next((r for r, u in enumerate(used) if u + n <= row_tokens), None)
        if fit is None:
            rows.append([])
            used.append(0)
            fit = len(rows) - 1
        rows[fit].append(i)
        used[fit] += n
    width = max(used)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    sequence = torch.full(shape, -1, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in sorted(members):  # in the items' order inside a row
            it, n = items[i], len(items[i])
            ids[r, at:at + n] = torch.tensor(it.input_ids)
            labels[r, at:at + n] = torch.tensor(it.labels)
            labels[r, at] = IGNORE
            positions[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            sequence[r, at:at + n] = i
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": positions, "sequence": sequence}


def padded_batches(items: list[Encoded], pad_id: int, batch_tokens: int = 2048,
                   seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`items` collated into length-grouped batches of at most `batch_tokens` padded tokens
    (an example longer than that alone): for loss and KL passes over a fixed set."""
    return [collate([items[i] for i in b], pad_id)
            for b in length_grouped_batches([len(x) for x in items], batch_tokens, seed=seed)]
