"""Keep an evaluation's evidence: predictions on disk (JSONL), metrics in the registry."""

from __future__ import annotations

import json
from tuneloop.core.files import atomic_path, atomic_write
from pathlib import Path


def record_evaluation(registry, folder: Path, result: dict, **fields):
    """Write folder/predictions.jsonl and metrics.json atomically, and add a registry row
    (named like the folder when the folder is named by an evaluation id)."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "predictions.jsonl") as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in result["predictions"]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write(folder / "metrics.json", json.dumps(result["metrics"], indent=2))
    if folder.name.startswith("ev-"):
        fields.setdefault("id", folder.name)
    return registry.add_evaluation(metrics=result["metrics"], **fields)
