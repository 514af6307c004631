"""Checkpoint I/O: trainable weights, optimizer, scheduler, RNG and data position, atomically.

A checkpoint is a folder written under a temporary name and renamed when complete, so a
crash mid-write leaves the previous checkpoint intact and no partial one visible.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(folder: Path, model, optimizer, scheduler, step: int, position: int, keep: int = 2) -> Path:
    """Write checkpoint `step` into folder/step-NNNNNN and keep the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
               tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "position": position}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint folder, skipping any that fail to read."""
    for ckpt in sorted(folder.glob("step-*"), reverse=True):
        try:
            json.loads((ckpt / "meta.json").read_text())
            load_file(str(ckpt / "trainable.safetensors"))
            return ckpt
        except Exception:  # a corrupt checkpoint: fall back to the previous one
            continue
    return None


def restore(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Load a checkpoint into model/optimizer/scheduler/RNG; returns its meta (step, position)."""
    weights = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return json.loads((ckpt / "meta.json").read_text())
