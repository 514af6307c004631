"""LoRA adapters on one shared base: loaded on first use, evicted least-recently-used under a
memory budget. Only the engine thread touches the pool (PEFT's adapter dict is not thread-safe)."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import torch

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


class AdapterPool:
    """Which adapters are resident on `model` (a base model, wrapped in a PeftModel on first load)."""

    def __init__(self, model: torch.nn.Module, budget_bytes: int):
        self.model = model
        self.budget_bytes = budget_bytes
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, oldest first
        self.loads = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(self.resident.values())

    def ensure(self, name: str, path: Path, pinned: set[str]) -> None:
        """Make adapter `name` (the PEFT folder at `path`) resident, then evict the least
        recently used ones not in `pinned` (adapters of rows being decoded) while over budget."""
        if name == BASE:
            return
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
        self.model.eval()
        self.resident[name] = _adapter_bytes(self.model, name)
        self.loads += 1
        for old in list(self.resident):
            if self.used_bytes <= self.budget_bytes:
                break
            if old != name and old not in pinned:
                with warnings.catch_warnings():  # "active adapter changed": rows name theirs
                    warnings.simplefilter("ignore")
                    self.model.delete_adapter(old)
                del self.resident[old]
                self.evictions += 1


def _adapter_bytes(model, name: str) -> int:
    marker = f".{name}."
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if marker in n)
