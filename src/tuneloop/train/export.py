"""Export a run's model for use outside tuneloop: the adapter as it is, or a merged model folder
(config, safetensors, tokenizer with its chat template) that plain transformers loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tuneloop import methods, models, project
from tuneloop.errors import TuneloopError
from tuneloop.models import head as label_head
from tuneloop.models import spans
from tuneloop.models import load_artifact
from tuneloop.store import Registry
from tuneloop.core.files import atomic_path


def export(run_id: str, out: Path, merge: bool = False, workspace: Path | None = None) -> dict:
    """Write run `run_id`'s model into `out` (which must not exist); returns what was written."""
    registry = Registry.open(workspace or project.workspace())
    run = registry.get_run(run_id)
    if run.status != "done" or not run.adapter_path:
        raise TuneloopError(f"run {run.id} is {run.status}; only finished runs can be exported")
    out = Path(out)
    if out.exists():
        raise TuneloopError(f"{out} already exists; choose a new folder (nothing was overwritten)")
    source = Path(run.adapter_path)
    method = run.method
    adapter = methods.method(method).artifact == "adapter"
    if adapter and not merge:
        with atomic_path(out) as tmp:
            shutil.copytree(source, tmp)
        return {"run_id": run.id, "path": str(out), "kind": "adapter", "base_model": run.base_model}
    lm, meta = load_artifact(source)
    if adapter:
        lm = lm.merge_and_unload()  # W + (alpha/r) B A, folded into each adapted weight
    lm = lm.to(torch.float32)
    tokenizer = models.load_tokenizer(meta["base_model"])

    # A head is kept in its own file, as in the run's artifact (the merged model folder stays
    # one that plain transformers loads).
    head, span_head = label_head.find(lm), spans.find(lm)
    if head is not None:
        del lm.label_head
    if span_head is not None:
        del lm.span_head

    def write(folder: Path) -> None:
        lm.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        if head is not None:
            label_head.save(head, folder)
        if span_head is not None:
            spans.save(span_head, folder)

    models.save_artifact(out, write, {**meta, "merged_from": run.id})
    return {"run_id": run.id, "path": str(out), "kind": "model", "base_model": run.base_model}
