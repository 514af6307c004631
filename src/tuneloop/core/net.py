"""Network helpers shared by the launcher (Accelerate's rendezvous) and the servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that no one listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
