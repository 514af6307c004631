"""The split of a prepared dataset: duplicate groups kept on one side (no leakage), stratified
by label; the split files written (with their reversible-anonymization maps)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from collections import Counter
from typing import Any, Iterator

from tuneloop.data.prepare_recipe import SplitSpec
from tuneloop.core.formats import file_sha256
from tuneloop.tasks import extract

SPLITS = ("train", "validation", "test")


def read_spool(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def split_groups(groups: list[int], labels: list | None, spec: SplitSpec) -> list[str]:
    """A split name per row. Rows of one group stay together; with labels, each label's groups
    are divided by the fractions on their own (stratified). Deterministic for a seed."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    strata: dict[Any, list[int]] = {}
    for g, rows in members.items():
        key = labels[rows[0]] if labels is not None and spec.stratify else None
        strata.setdefault(key, []).append(g)
    rng = random.Random(spec.seed)
    out = [""] * len(groups)
    for key in sorted(strata, key=str):
        gs = sorted(strata[key])
        rng.shuffle(gs)
        total = sum(len(members[g]) for g in gs)
        want = {"test": spec.test * total, "validation": spec.validation * total}
        got = Counter()
        for g in gs:
            # Fill test, then validation, then train; round to the nearest row count.
            name = next((s for s in ("test", "validation")
                         if got[s] + len(members[g]) / 2 <= want[s]), "train")
            got[name] += len(members[g])
            for i in members[g]:
                out[i] = name
    return out


def write_splits(final: Path, survivors: list[int], assignment: list[str], drop: set[int],
                  tmp: Path, maps: dict[int, dict[str, str]], workspace: Path) -> dict:
    """Write train/validation/test; reversible maps are re-keyed to each split's line numbers."""
    position = {s: n for n, s in enumerate(survivors)}
    split_maps: dict[str, dict[int, dict[str, str]]] = {s: {} for s in SPLITS}
    files = {s: (tmp / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
    info = {s: {"rows": 0, "labels": Counter()} for s in SPLITS}
    try:
        for i, line in enumerate(final.open(encoding="utf-8")):
            n = position.get(i)
            if n is None or i in drop:
                continue
            name = assignment[n]
            files[name].write(line)
            row = json.loads(line)
            info[name]["rows"] += 1
            if i in maps:
                split_maps[name][info[name]["rows"]] = maps[i]
            if row.get("label") is not None:
                info[name]["labels"][str(row["label"])] += 1
            if isinstance(row.get("fields"), dict):  # extraction: values per field (type)
                counts = {k: len(extract.values(v)) for k, v in row["fields"].items()}
                split = info[name]
                split.setdefault("entities", Counter()).update({k: n for k, n in counts.items() if n})
                split["empty_rows"] = split.get("empty_rows", 0) + (not any(counts.values()))
    finally:
        for f in files.values():
            f.close()
    for s in SPLITS:
        path = tmp / f"{s}.jsonl"
        if info[s]["rows"] == 0:
            path.unlink()
            del info[s]
            continue
        info[s]["sha256"] = file_sha256(path)
        if split_maps[s]:
            from tuneloop.data import pii

            pii.write_map(pii.map_path(path), split_maps[s], workspace)
        info[s]["labels"] = dict(sorted(info[s]["labels"].items()))
        if "entities" in info[s]:
            info[s]["entities"] = dict(sorted(info[s]["entities"].items()))
    return info
