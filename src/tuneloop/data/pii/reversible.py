"""The reversible map (placeholder -> original), encrypted with the workspace's key (Fernet)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tuneloop.errors import TuneloopError
from tuneloop.core.files import atomic_write


def key_path(workspace: Path) -> Path:
    return workspace / "keys" / "pii.key"


def _fernet(workspace: Path, create: bool):
    from cryptography.fernet import Fernet

    path = key_path(workspace)
    if not path.is_file():
        if not create:
            raise TuneloopError(f"{path}: no key; reversible maps can only be opened in the "
                                "workspace that wrote them")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
    return Fernet(path.read_bytes())


def write_map(path: Path, maps: dict[int, dict[str, str]], workspace: Path) -> None:
    """Encrypt {row number: {stand-in: original}} to `path` (temp file + rename)."""
    token = _fernet(workspace, create=True).encrypt(json.dumps(maps, ensure_ascii=False).encode())
    atomic_write(path, token)


def read_map(path: Path, workspace: Path) -> dict[int, dict[str, str]]:
    from cryptography.fernet import InvalidToken

    try:
        raw = _fernet(workspace, create=False).decrypt(Path(path).read_bytes())
    except InvalidToken:
        raise TuneloopError(f"{path}: not readable with this workspace's key "
                            f"({key_path(workspace)})") from None
    return {int(k): v for k, v in json.loads(raw).items()}


def restore(value, mapping: dict[str, str]):
    """Put the originals back into a value (string, list or dict) anonymized in reversible mode."""
    if isinstance(value, str):
        for stand_in in sorted(mapping, key=len, reverse=True):
            value = value.replace(stand_in, mapping[stand_in])
        return value
    if isinstance(value, list):
        return [restore(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: restore(v, mapping) for k, v in value.items()}
    return value


def map_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".map.enc")
