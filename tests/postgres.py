"""A PostgreSQL server of its own, for the tests and the soak bench that stop and restart it:
`initdb` into a temporary folder, listening on a free loopback port, removed afterwards. Where
PostgreSQL's server programs are not installed, `cluster()` raises `Unavailable`."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


class Unavailable(RuntimeError):
    """No PostgreSQL server programs here (or no user to run them as)."""


def _bin() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class Cluster:
    def __init__(self, folder: Path, bin: Path, as_user: list[str]):
        self.folder, self.bin, self.as_user = folder, bin, as_user
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"),
                        "-w", "-t", "60", *args], check=True, capture_output=True)

    def start(self) -> None:
        self._ctl("-l", str(self.folder / "log"), "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server ("fast": its sessions are cut, as in a restart by an operator)."""
        self._ctl("-m", mode, "stop")


@contextlib.contextmanager
def cluster():
    """A running server (yields its `Cluster`); stopped and deleted at the end."""
    bin = _bin()
    if bin is None:
        raise Unavailable("PostgreSQL's server programs (initdb, pg_ctl) are not installed")
    as_user = []
    folder = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root: run it as postgres
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            raise Unavailable("running as root and there is no postgres user") from None
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    server = Cluster(folder, bin, as_user)
    try:
        subprocess.run([*as_user, str(bin / "initdb"), "-D", str(folder / "data"), "-U",
                        "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True)
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)
