"""Replies recorded from a real vLLM 0.32.0 server, served back on 127.0.0.1 (tests of the vLLM client's parsing).

Not a test module (``tests/`` is on ``sys.path``): ``test_backend_vllm.py`` imports it.
``tests/fixtures/vllm/exchanges_0.32.0.json`` holds each exchange as it happened
(request, status, body; recorded from ``scripts/serve_vllm.sh`` with the embedded
model, long prompts abbreviated, paths made relative). Nothing here models vLLM:
the replies are vLLM's own, and the real server is exercised by
``tests/realserver/test_vllm.py``. A test queues the exchange it wants answered next
(``answer_next``); ``GET /v1/models`` and a request for an unknown path answer with
their own recordings unless something is queued.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from repo_paths import FIXTURES

from freelm.testing.http_server import LocalHTTPServer, QuietHandler

EXCHANGES = {e["name"]: e for e in json.loads((FIXTURES / "vllm" / "exchanges_0.32.0.json").read_text())["exchanges"]}


class _Handler(QuietHandler):
    def do_GET(self) -> None:
        self._answer("models")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server_state.bodies.append((self.path, json.loads(self.rfile.read(length) or b"null")))
        self._answer("no_route")

    def _answer(self, default: str) -> None:
        state: ReplayTestServer = self.server_state
        exchange = EXCHANGES[state.queue.popleft() if state.queue else default]
        body = exchange["response"]
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        self.send_response(exchange["status"])
        self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ReplayTestServer(LocalHTTPServer):
    """``with ReplayTestServer() as srv: srv.answer_next("base_stop"); ...; srv.bodies[-1]``."""

    handler_class = _Handler

    def __init__(self) -> None:
        self.queue: deque[str] = deque()
        self.bodies: list[tuple[str, Any]] = []  # (path, JSON body) of every POST, in order

    def answer_next(self, *names: str) -> None:
        self.queue.extend(names)

    @property
    def base_url(self) -> str:
        return f"{self.origin}/v1"
