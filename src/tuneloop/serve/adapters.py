"""Many LoRA adapters on one shared base, applied per row in one forward pass.

Every resident adapter owns a band of columns in two stacked matrices per projection: A
(in × Σr) and B (Σr × out, the adapter's scaling folded in). A batch row computes
`base(x) + ((x @ A) * row_mask) @ B`, where its mask keeps only its adapter's band (all zero
for rows on the bare base). That is two matrix products per projection whatever the number
of adapters (only the bands a batch uses are computed), instead of PEFT's mixed-batch path, which slices the batch and runs two small
products per adapter per projection: with 8 rank-16 adapters on SmolLM2 at batch 32 that path
took 834 ms a decode step against 343 ms for the bare base on this CPU (bench/serve_load.py
records the end-to-end result). The outputs equal PEFT's (tests/test_engine.py checks each
adapter's replies against PEFT's own model).

Adapters are loaded on first use and evicted least recently used beyond a memory budget.
Only the engine thread touches the stack. Adapters with parts this does not cover (DoRA,
embedding LoRA, bias or modules_to_save) are refused here; the router merges those instead.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

BASE = "__base__"  # the name of "no adapter": such rows get the base model's output
PREFIX = "base_model.model."


class Unsupported(ValueError):
    """An adapter that needs more than stacked LoRA on linear layers."""


def check_supported(folder: Path) -> dict:
    """The adapter's config if stacked LoRA can serve it; else Unsupported saying why."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise Unsupported(f"peft_type {config.get('peft_type')}")
    if config.get("use_dora"):
        raise Unsupported("DoRA")
    if config.get("modules_to_save"):
        raise Unsupported("modules_to_save")
    if config.get("bias", "none") != "none":
        raise Unsupported("LoRA bias")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise Unsupported("per-module ranks")
    return config


class StackedLinear(nn.Module):
    """A base nn.Linear plus the bands of every resident adapter."""

    def __init__(self, base: nn.Linear, stack: "AdapterPool"):
        super().__init__()
        self.base, self.stack = base, stack
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("A", torch.zeros(base.in_features, 0, dtype=dtype, device=device))
        self.register_buffer("B", torch.zeros(0, base.out_features, dtype=dtype, device=device))
        self.used = False  # whether any resident adapter targets this projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mask, cols = self.stack.row_mask, self.stack.columns
        if not self.used or mask is None:
            return y
        a, b = (self.A, self.B) if cols is None else (self.A[:, cols], self.B[cols])
        return y + ((x @ a) * mask) @ b


class AdapterPool:
    """The adapters resident on one base model, as bands of stacked LoRA matrices."""

    def __init__(self, model: nn.Module, budget_bytes: int):
        self.model = model
        self.budget_bytes = budget_bytes
        # name -> (rank, bytes), least recently used first; `layout` is the band order.
        self.resident: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.layout: list[str] = []
        self.row_mask: torch.Tensor | None = None
        self.columns: torch.Tensor | None = None  # the bands this batch uses, if not all
        self.loads = self.evictions = 0
        self.layers: dict[str, StackedLinear] = {}
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if isinstance(child, nn.Linear) and child is not model.get_output_embeddings():
                    stacked = StackedLinear(child, self)
                    setattr(module, child_name, stacked)
                    self.layers[full] = stacked

    @property
    def used_bytes(self) -> int:
        return sum(b for _, b in self.resident.values())

    def ensure(self, name: str, path: Path | None, pinned: set[str]) -> None:
        """Make adapter `name` (PEFT folder `path`) resident; then evict the least recently used
        adapters not in `pinned` (those of rows being decoded) while over the budget."""
        if name == BASE:
            return
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        self._add(name, Path(path))
        for old in list(self.resident):
            if self.used_bytes <= self.budget_bytes:
                break
            if old != name and old not in pinned:
                self._remove(old)

    def select(self, adapters: list[str]) -> None:
        """Set the row mask for a batch whose row i uses adapters[i]."""
        width = sum(r for r, _ in self.resident.values())
        if width == 0 or all(a == BASE for a in adapters):
            self.row_mask = self.columns = None
            return
        some = next(iter(self.layers.values())).A
        mask = torch.zeros(len(adapters), 1, width, dtype=some.dtype)
        bands, start = {}, 0
        for adapter in self.layout:
            rank = self.resident[adapter][0]
            bands[adapter] = (start, start + rank)
            start += rank
        for row, adapter in enumerate(adapters):
            if adapter != BASE:
                lo, hi = bands[adapter]
                mask[row, 0, lo:hi] = 1
        # Bands no row uses cost products for nothing: with few adapters in the batch (a
        # prefill of newly arrived requests, say), compute only the bands in use.
        used = mask[:, 0, :].amax(dim=0).nonzero()[:, 0]
        if len(used) < width:
            self.columns, mask = used.to(some.device), mask[:, :, used]
        else:
            self.columns = None
        self.row_mask = mask.to(some.device)

    def _add(self, name: str, folder: Path) -> None:
        config = check_supported(folder)
        weights = load_file(str(folder / "adapter_model.safetensors"))
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        scaling = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if m is None or m.group(1) not in self.layers:
                raise Unsupported(f"weight {key} is not LoRA on a linear layer of this model")
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        size = 0
        for module_name, layer in self.layers.items():
            a = pairs.get(module_name, {}).get("A")  # (rank, in)
            b = pairs.get(module_name, {}).get("B")  # (out, rank)
            if a is None:
                a_band = layer.A.new_zeros(layer.base.in_features, rank)
                b_band = layer.B.new_zeros(rank, layer.base.out_features)
            else:
                a_band = a.t().to(layer.A.dtype)
                b_band = (b.t() * scaling).to(layer.B.dtype)
                layer.used = True
                size += a.numel() * a.element_size() + b.numel() * b.element_size()
            layer.A = torch.cat([layer.A, a_band.to(layer.A.device)], dim=1)
            layer.B = torch.cat([layer.B, b_band.to(layer.B.device)], dim=0)
        self.resident[name] = (rank, size)
        self.layout.append(name)
        self.loads += 1

    def _remove(self, name: str) -> None:
        start = sum(self.resident[a][0] for a in self.layout[:self.layout.index(name)])
        rank = self.resident.pop(name)[0]
        self.layout.remove(name)
        for layer in self.layers.values():
            layer.A = torch.cat([layer.A[:, :start], layer.A[:, start + rank:]], dim=1)
            layer.B = torch.cat([layer.B[:start], layer.B[start + rank:]], dim=0)
            layer.used = bool(layer.B.abs().sum()) if layer.B.numel() else False
        self.evictions += 1
