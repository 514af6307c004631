"""Checkpoint I/O: trainable weights, optimizer, scheduler, RNG, data position and the loop's
counters (curves, tokens, time), atomically and verifiably.

A checkpoint is a folder written under a temporary name and renamed when complete, so a
crash mid-write leaves the previous checkpoint intact and no partial one visible. Its
manifest holds every file's SHA-256: a checkpoint damaged later (a truncated copy, a bad
disk) fails verification and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneloop.errors import TuneloopError

MANIFEST = "manifest.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class Whole:
    """How checkpoints read and write a model this process holds whole. (A sharded model's
    weights and optimizer state are gathered and scattered instead: shard.Sharded.)"""

    sharded = False

    def weights(self, model) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def optimizer(self, model, optimizer) -> dict:
        return optimizer.state_dict()

    def load_weights(self, model, weights: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)

    def load_optimizer(self, model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


WHOLE = Whole()


def save(folder: Path, model, optimizer, scheduler, step: int, position: int, loop: dict | None = None,
         keep: int = 2, access: Whole = WHOLE, write: bool = True) -> Path | None:
    """Write checkpoint `step` into folder/step-NNNNNN and keep the newest `keep`.

    `loop` is the training loop's own state (curves, token count, seconds) for an exact resume.
    A sharded model's every process calls this (gathering is collective); only the one with
    `write` writes.
    """
    weights, optimizer_state = access.weights(model), access.optimizer(model, optimizer)
    if not write:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **rng},
               tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "position": position,
                                               "loop": loop or {}, "sharded": access.sharded}))
    files = sorted(p.name for p in tmp.iterdir())
    (tmp / MANIFEST).write_text(json.dumps({name: _sha256(tmp / name) for name in files}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(model, path: Path, access: Whole = WHOLE, write: bool = True) -> None:
    """The trainable weights alone (the best model so far), written atomically."""
    weights = access.weights(model)
    if not write:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(weights, str(tmp))
    os.replace(tmp, path)


def load_weights(model, path: Path, access: Whole = WHOLE) -> None:
    access.load_weights(model, load_file(str(path)))


def verify(ckpt: Path) -> bool:
    """Every file the manifest lists is present with its recorded SHA-256."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        return bool(manifest) and all(_sha256(ckpt / name) == digest
                                      for name, digest in manifest.items())
    except (OSError, ValueError):
        return False


def latest(folder: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are skipped."""
    for ckpt in sorted(folder.glob("step-*"), reverse=True):
        if verify(ckpt):
            return ckpt
    return None


def restore(ckpt: Path, model, optimizer, scheduler, access: Whole = WHOLE) -> dict:
    """Load a checkpoint into model/optimizer/scheduler/RNG; returns its meta (step, position,
    loop)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("sharded", False) != access.sharded:
        raise TuneloopError(
            f"{ckpt} was written by a {'sharded' if meta.get('sharded') else 'whole-model'} "
            f"run; resume it {'with' if meta.get('sharded') else 'without'} --fsdp")
    load_weights(model, ckpt / "trainable.safetensors", access)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    access.load_optimizer(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
