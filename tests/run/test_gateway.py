"""The runner through SGLang's model gateway (sglang-router) as one endpoint: health and a whole run.

The gateway stand-in below reproduces what the runner meets at a gateway, as
sgl-model-gateway documents it (``docs/advanced_features/sgl_model_gateway.md``,
"Admin and Health Endpoints"): ``/health`` and ``/liveness`` always answer 200
(liveness, even with no worker up), ``/readiness`` answers 200 only while a
worker is healthy (503 otherwise), and everything else (``/generate``,
``/server_info``, ...) is forwarded to a worker. Routing here is round robin:
which worker serves a call is the gateway's business, not the runner's.
"""

from __future__ import annotations

import asyncio
import itertools
import json

import httpx

from freelm.backends.sglang import SGLangBackend
from freelm.data import Problem
from freelm.records import read_rollouts
from freelm.run.batch import run_batch
from freelm.run.components import build_components
from freelm.run.spec import RunSpec
from freelm.testing.engines import ScriptedEngine, ScriptedTokenizer
from freelm.testing.http_server import LocalHTTPServer, QuietHandler
from freelm.testing.sglang_server import SGLangTestServer
from freelm.tokenizer import Tokenizer


class _GatewayHandler(QuietHandler):
    def do_GET(self) -> None:
        self._answer(None)

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

    def _answer(self, body: bytes | None) -> None:
        gateway: GatewayStandIn = self.server_state
        if self.path in ("/health", "/liveness"):
            return self._send(200, b'{"status": "ok"}')
        if self.path == "/readiness":
            healthy = sum(httpx.get(f"{w}/health", timeout=10).status_code == 200 for w in gateway.workers)
            status = {"status": "ready" if healthy else "not_ready", "healthy_workers": healthy}
            return self._send(200 if healthy else 503, json.dumps(status).encode())
        worker = next(gateway.turn)
        gateway.forwarded += 1
        reply = httpx.request(
            self.command, f"{worker}{self.path}", content=body, headers={"Content-Type": "application/json"}, timeout=60
        )
        self._send(reply.status_code, reply.content)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class GatewayStandIn(LocalHTTPServer):
    handler_class = _GatewayHandler

    def __init__(self, workers: list[str]):
        self.workers = workers
        self.turn = itertools.cycle(workers)
        self.forwarded = 0


def test_health_asks_the_gateways_readiness_not_its_liveness_and_a_plain_server_its_health():
    engine = ScriptedEngine({None: "x"})
    with SGLangTestServer(engine, starting=True) as worker, GatewayStandIn([worker.url]) as gateway:

        async def probe(url: str) -> tuple[bool, bool | None]:
            backend = SGLangBackend(url, max_retries=0)
            try:
                return await backend.health(), backend._readiness
            finally:
                await backend.aclose()

        assert httpx.get(f"{gateway.origin}/health").status_code == 200  # liveness says nothing about workers
        assert asyncio.run(probe(gateway.origin)) == (False, True)  # no worker ready: the runner sees it
        assert asyncio.run(probe(worker.url)) == (False, False)  # a plain server: no /readiness, its /health
        worker.finish_starting()
        assert asyncio.run(probe(gateway.origin)) == (True, True)
        assert asyncio.run(probe(worker.url)) == (True, False)


def test_a_run_through_the_gateway_as_one_endpoint_completes_every_rollout(tmp_path):
    engines = [ScriptedEngine({None: "Case 1 is checked. </think>\\boxed{0}", "free": "[]"}) for _ in range(2)]
    with SGLangTestServer(engines[0]) as a, SGLangTestServer(engines[1]) as b, GatewayStandIn([a.url, b.url]) as gw:
        out = tmp_path / "out.jsonl"
        spec = RunSpec.from_argv(
            [
                "--data", "unused", "--output", str(out), "--endpoint", gw.origin.removeprefix("http://"),
                "--clean-every", "8", "--max-tokens", "24", "--context-limit", "4096", "--concurrency", "4",
                "--n-rollouts", "2", "--no-progress",
            ]
        )  # fmt: skip
        components = build_components(spec, tokenizer=Tokenizer(ScriptedTokenizer()))
        problems = [Problem(id=str(i), source="t", prompt=f"Problem {i}?", answer="0") for i in range(4)]

        async def go():
            try:
                assert await components.reasoner.check_health() == 1
                return await run_batch(problems, spec, components)
            finally:
                await components.aclose()

        summary = asyncio.run(go())
        records = read_rollouts(out)
        assert summary.failed == 0
        assert sorted((r.id, r.rollout) for r in records) == [(str(i), k) for i in range(4) for k in range(2)]
        assert all(r.finish_reason in ("stop", "length") and r.error is None for r in records), records[0]
        assert any(r.cleaning_rounds for r in records)  # cleaning calls went through the gateway too
        assert a.requests["/generate"] > 0 and b.requests["/generate"] > 0  # the gateway spread them
        assert gw.forwarded >= a.requests["/generate"] + b.requests["/generate"]
