"""A real tuneloop server on loopback for tests: uvicorn on a free port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx2 as httpx
import uvicorn

from tuneloop.serve.app import Settings, create_app


@contextmanager
def running(settings: Settings):
    """Yields the server's base URL (http://127.0.0.1:PORT) while it runs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
