"""Checkpoint I/O: trainable weights, optimizer, scheduler, RNG, data position and the loop's
counters (curves, tokens, time), atomically and verifiably.

A checkpoint is a folder written under a temporary name and renamed when complete, so a
crash mid-write leaves the previous checkpoint intact and no partial one visible. Its
manifest holds every file's SHA-256: a checkpoint damaged later (a truncated copy, a bad
disk) fails verification and the previous one is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tuneloop.errors import TuneloopError
from tuneloop.core.files import atomic_path

MANIFEST = "manifest.json"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


class Whole:
    """How checkpoints read and write a model this process holds whole. (A sharded model's
    weights and optimizer state are gathered and scattered instead: shard.Sharded, zero.Zero.)
    `sharding` names the run's sharding (None, "fsdp", "zero2", "zero3"): a checkpoint resumes
    only with the same."""

    sharding: str | None = None

    def weights(self, model) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def optimizer(self, model, optimizer) -> dict:
        return optimizer.state_dict()

    def load_weights(self, model, weights: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)

    def save_own(self, folder: Path) -> None:
        """What each process writes itself into a checkpoint's folder (every rank calls)."""

    def load_optimizer(self, model, optimizer, state: dict, folder: Path | None = None) -> None:
        optimizer.load_state_dict(state)


WHOLE = Whole()
SHARDINGS = {None: "with the whole model in each process", "fsdp": "sharded with FSDP",
             "zero2": "sharded with DeepSpeed ZeRO-2", "zero3": "sharded with DeepSpeed ZeRO-3"}
FLAGS = {"fsdp": "--fsdp", "zero2": "--deepspeed zero2", "zero3": "--deepspeed zero3"}
"""The `tuneloop train` flags that ask for each sharding."""


def save(folder: Path, model, optimizer, scheduler, step: int, position: int, loop: dict | None = None,
         keep: int = 2, access: Whole = WHOLE, write: bool = True) -> Path | None:
    """Write checkpoint `step` into folder/step-NNNNNN and keep the newest `keep`.

    `loop` is the training loop's own state (curves, token count, seconds) for an exact resume.
    A sharded model's every process calls this (gathering is collective); only the one with
    `write` writes.
    """
    weights, optimizer_state = access.weights(model), access.optimizer(model, optimizer)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    try:
        if write:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        access.save_own(tmp)  # every rank its own part (ZeRO: its optimizer partition)
        if not write:
            return None
        save_file(weights, str(tmp / "trainable.safetensors"))
        rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **rng},
                   tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "position": position,
                                                   "loop": loop or {}, "sharding": access.sharding}))
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        (tmp / MANIFEST).write_text(json.dumps({name: _sha256(tmp / name) for name in files}))
    except Exception as exc:  # safetensors and torch.save report a full disk in their own types
        shutil.rmtree(tmp, ignore_errors=True)
        if not disk_full(exc):
            raise
        previous = latest(folder)
        raise TuneloopError(
            f"no space left on the disk of {folder} while writing the checkpoint of step {step}; "
            + (f"the previous checkpoint ({previous.name}) is intact: free some space, then "
               "resume the run (tuneloop train --resume RUN_ID)" if previous else
               "no checkpoint was written yet: free some space and start the run again")) from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of space (or quota), however the library reported it."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc).lower()
    return any(s in text for s in ("no space left", "os error 28", "errno 28", "file write failed"))


def save_weights(model, path: Path, access: Whole = WHOLE, write: bool = True) -> None:
    """The trainable weights alone (the best model so far), written atomically."""
    weights = access.weights(model)
    if not write:
        return
    with atomic_path(path) as tmp:
        save_file(weights, str(tmp))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_weights(model, path: Path, access: Whole = WHOLE) -> None:
    access.load_weights(model, read_weights(path))


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
    sharding = meta.get("sharding", "fsdp" if meta.get("sharded") else None)
    if sharding != access.sharding:
        flag = f"with {FLAGS[sharding]}" if sharding else "without --fsdp or --deepspeed"
        raise TuneloopError(f"{ckpt} was written by a run {SHARDINGS[sharding]}; resume it {flag}")
    load_weights(model, ckpt / "trainable.safetensors", access)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    access.load_optimizer(model, optimizer, state["optimizer"], ckpt)
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
