"""Personal data in files: scan, anonymize (atomically, with its map) and re-identify."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tuneloop.data.pii.detect import Detector
from tuneloop.data.pii.replace import anonymize_rows
from tuneloop.data.pii.reversible import map_path, read_map, restore, write_map
from tuneloop.data.rows import get_path, text_paths
from tuneloop.core.files import atomic_path
from tuneloop.errors import TuneloopError


def _file_rows(path: Path, fields: Iterable[str] | None):
    """Readable rows of a data file in batches of 256; an unreadable row stops with its line."""
    from tuneloop.data.ingest import read_rows

    batch: list[tuple[int, dict]] = []
    for line, row, problem in read_rows(path):
        if problem is not None:
            raise TuneloopError(f"{path} line {problem.line}: {problem.code}: {problem.message}; "
                                "nothing was written")
        if not isinstance(row, dict):
            raise TuneloopError(f"{path} line {line}: a row must be a JSON object; nothing was "
                                "written")
        batch.append((line, row))
        if len(batch) == 256:
            yield batch
            batch = []
    if batch:
        yield batch


def scan_file(path: str | Path, detector: Detector, fields: Iterable[str] | None = None) -> dict:
    """Personal data in a file, reported without changing it: counts by type and each finding's
    line, field path and type (the text itself is not repeated)."""
    path = Path(path)
    by_type: dict[str, int] = {}
    findings, rows, with_pii = [], 0, 0
    for batch in _file_rows(path, fields):
        per_row = [text_paths(r, fields) for _, r in batch]
        found = iter(detector.find_many([get_path(r, p) for (_, r), ps in zip(batch, per_row)
                                         for p in ps]))
        for (line, _), paths in zip(batch, per_row):
            rows += 1
            hit = False
            for p in paths:
                for f in next(found):
                    hit = True
                    by_type[f.type] = by_type.get(f.type, 0) + 1
                    if len(findings) < 1000:
                        findings.append({"line": line, "field": ".".join(map(str, p)),
                                         "type": f.type, "start": f.start, "end": f.end,
                                         "score": f.score})
            with_pii += hit
    return {"path": str(path), "rows": rows, "rows_with_pii": with_pii,
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
            "findings": findings}


def anonymize_file(src: str | Path, dst: str | Path, detector: Detector, mode: str = "placeholder",
                   fields: Iterable[str] | None = None, workspace: Path | None = None) -> dict:
    """Anonymize every row of a data file into JSONL at `dst` (temp file + rename: a failure
    leaves no output). Reversible mode also writes `dst`.map.enc."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise TuneloopError(f"{dst}: write the anonymized copy to a new file, not over the input")
    if mode == "reversible" and workspace is None:
        raise TuneloopError("reversible mode needs a workspace to keep its key in")
    by_type: dict[str, int] = {}
    maps: dict[int, dict[str, str]] = {}
    rows = with_pii = 0
    with atomic_path(dst) as tmp, tmp.open("w", encoding="utf-8") as out:
        for batch in _file_rows(src, fields):
            new, findings, row_maps = anonymize_rows([r for _, r in batch], detector, mode,
                                                     fields)
            for (line, _), row, found, mapping in zip(batch, new, findings, row_maps):
                rows += 1
                with_pii += bool(found)
                for f in found:
                    by_type[f.type] = by_type.get(f.type, 0) + 1
                if mapping:
                    maps[rows] = mapping
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        if maps:  # (before the output appears: a reversible copy never lacks its map)
            write_map(map_path(dst), maps, workspace)
    return {"input": str(src), "output": str(dst), "rows": rows, "rows_with_pii": with_pii,
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])), "mode": mode,
            "map": str(map_path(dst)) if maps else None}


def reidentify_file(src: str | Path, dst: str | Path, map_file: str | Path,
                    workspace: Path) -> int:
    """Undo reversible anonymization: row n of `src` gets the originals of map entry n."""
    src, dst = Path(src), Path(dst)
    maps = read_map(Path(map_file), workspace)
    rows = 0
    with atomic_path(dst) as tmp, tmp.open("w", encoding="utf-8") as out:
        for batch in _file_rows(src, None):
            for _, row in batch:
                rows += 1
                out.write(json.dumps(restore(row, maps.get(rows, {})), ensure_ascii=False)
                          + "\n")
    return rows
