"""Servers this project starts as child processes on 127.0.0.1: a free port, and the addresses derived from it.

Shared by :class:`freelm.vllm_server.VLLMServer` and the test tier's
``LlamaServer`` (``tests/realserver/conftest.py``): servers in tests,
benchmarks and the demo listen on loopback only.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """A server on ``127.0.0.1:port``: its ``endpoint`` (as ``runner.py --endpoint`` takes it) and ``url``."""

    port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"
