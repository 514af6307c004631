"""Rows from JSONL, CSV and Parquet files, streamed, with a column → field mapping.

Every row comes with its line (JSONL and CSV: the line in the file; Parquet: the row number)
so a problem names where it is. Columns that hold JSON text (a `messages` list exported to CSV)
are decoded.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from tuneloop.core.formats import MAX_LINE_BYTES, Problem, read_lines
from tuneloop.errors import TuneloopError

SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet")
JSON_FIELDS = ("messages", "fields", "prompt", "entities")  # may arrive as JSON text in CSV


def read_rows(path: str | Path, mapping: dict[str, str] | None = None
              ) -> Iterator[tuple[int, dict | None, Problem | None]]:
    """(line, row, None) for each row, or (line, None, problem) for one that cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise TuneloopError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TuneloopError(f"{path}: unknown format {suffix or '(no suffix)'}; tuneloop reads "
                            f"{', '.join(SUFFIXES)}")
    if suffix in (".csv", ".tsv"):
        rows = _csv_rows(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        rows = _jsonl_rows(path)
    for line, row, problem in rows:
        if row is not None and mapping:
            row, problem = _apply(row, mapping, line)
        yield line, row, problem


def _jsonl_rows(path: Path):
    for number, text, problem in read_lines(path):
        if problem is not None:
            yield number, None, problem
            if number == 0:
                return
            continue
        try:
            yield number, json.loads(text), None
        except json.JSONDecodeError as exc:
            yield number, None, Problem(number, "invalid_json",
                                        f"not valid JSON: {exc.msg} at column {exc.colno}")


def _csv_rows(path: Path, delimiter: str):
    csv.field_size_limit(MAX_LINE_BYTES)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            for row in reader:
                line = reader.line_num
                if None in row:  # more cells than header names
                    yield line, None, Problem(line, "csv_extra_cells", f"{len(row[None])} cell(s) "
                                              f"past the {len(reader.fieldnames)} header columns; "
                                              "quote values that contain the delimiter")
                    continue
                missing = [k for k, v in row.items() if v is None]
                if missing:
                    yield line, None, Problem(line, "csv_missing_cells",
                                              f"no value for column(s) {missing}")
                    continue
                yield line, {k: _maybe_json(k, v) for k, v in row.items()}, None
        except UnicodeDecodeError as exc:
            raise TuneloopError(f"{path}: not UTF-8 text (byte {exc.start}); re-export as UTF-8") from None
        except csv.Error as exc:
            raise TuneloopError(f"{path} line {reader.line_num}: {exc}") from None


def _maybe_json(key: str, value: str):
    if key in JSON_FIELDS and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own types for a damaged file
        raise TuneloopError(f"{path}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in table.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield number, row, None


def _apply(row: dict, mapping: dict[str, str], line: int) -> tuple[dict | None, Problem | None]:
    """Keep only the mapped columns, under tuneloop's field names."""
    if not isinstance(row, dict):
        return row, None  # parse_row reports the type
    missing = [source for source in mapping.values() if source not in row]
    if missing:
        return None, Problem(line, "missing_column", f"no column {missing[0]!r} (mapped to "
                             f"{next(k for k, v in mapping.items() if v == missing[0])!r}); "
                             f"columns here: {', '.join(map(str, row)) or 'none'}")
    return {field: _maybe_json(field, row[source]) if isinstance(row[source], str) else row[source]
            for field, source in mapping.items()}, None
