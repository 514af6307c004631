"""The running batch's KV cache: rows joined as they are admitted, dropped as they finish.
Rows are left-padded to one width; the attention mask marks the padding."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def join_rows(cache, mask, new_cache, new_mask):
    """The running batch's KV cache and mask with new rows appended (shorter side left-padded)."""
    if cache is None:
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])
    layers = []
    for old, add in zip(cache.layers, new_cache.layers):
        layers.append((torch.cat([_left_pad(old.keys, width), _left_pad(add.keys, width)]),
                       torch.cat([_left_pad(old.values, width), _left_pad(add.values, width)])))
    joined = torch.cat([_left_pad_mask(mask, width), _left_pad_mask(new_mask, width)])
    return DynamicCache(ddp_cache_data=layers), joined


def keep_rows(cache, mask, keep: list[int]):
    """Keep only rows `keep`, and drop leading columns that are padding in every kept row."""
    if not keep:
        return None, None
    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    start = int((mask.sum(0) > 0).nonzero()[0])
    layers = [(layer.keys.index_select(0, index)[:, :, start:],
               layer.values.index_select(0, index)[:, :, start:]) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=layers), mask[:, start:]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros((*t.shape[:-2], missing, t.shape[-1])), t], dim=-2)


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - m.shape[1]
    return m if missing == 0 else torch.cat([m.new_zeros((m.shape[0], missing)), m], dim=1)
