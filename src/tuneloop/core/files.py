"""Atomic writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every artifact tuneloop writes (recipes, reports, predictions, checkpoints, model folders) goes
through `atomic_path`: the writer fills a temporary sibling, which is renamed over the target
only once it is complete. A rename within one folder is atomic on POSIX file systems.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(target: str | Path, folder: bool = False) -> Iterator[Path]:
    """A temporary sibling of `target` to write (a folder, created, when `folder`), renamed
    over `target` when the block ends without an error and removed when it raises."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a folder cannot be renamed over a folder that holds files
        os.replace(tmp, target)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def atomic_write(target: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `target` atomically; returns `target`."""
    target = Path(target)
    with atomic_path(target) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return target
