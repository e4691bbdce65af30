"""Runner throughput against a model-free SGLang-protocol endpoint that answers every request after a fixed delay.

What it measures: the client side of ``freelm run`` (asyncio loop, EndpointPool,
the SGLang aiohttp client, the reasoning/cleaning loop with its deletions and
re-tokenization, JSONL writes). The server (``freelm.testing.sglang_server``
with a ``ScriptedEngine``: sleep, then answer) runs in its own process so the
two do not share a GIL. Every rollout runs in Free()LM mode: ``--max-tokens /
--clean-every`` reasoning chunks, each followed by a cleaning call, so one
rollout is ``2 * rounds`` requests.

The reasoner writes numbered sentences ("Case 7 is checked. "), continuing from
the last number in its context, and the cleaner deletes every complete sentence
but the last one, as the oracle of a real task would: each cleaning round
really deletes spans, so the loop's edit, the kept-prefix search and the
re-tokenization of the remainder all run. The same workload with a cleaner that
always answers ``[]`` (nothing deleted, nothing re-tokenized) is measured in the
same invocation as the reference, so the cost of the deletion path shows as
the difference in client CPU per request.

With every request taking ``delay`` seconds and ``concurrency`` rollouts in
flight, the ideal rate is ``concurrency / delay`` requests/s; the ratio
achieved/ideal is the fraction of time the client keeps every slot busy. Beside
the runner, a minimal aiohttp client (``concurrency`` workers, each posting the
next of the very request bodies the runner sent, in the runner's order, and
parsing the answer; nothing else) is measured against the same server in the
same invocation: what any Python client reaches on this machine with the same
server work per request. Both are one client process against one server process.

The server is the stand-in as the tests run it (``http.server``, a thread per
connection, one GIL), with a KV budget that holds the whole run: with the
default 2**17 tokens every insert after the first few hundred requests evicted, and
each eviction scans every leaf of the tree under the cache's lock. The
scripted reasoner reads only the tail of its context and writes only what a
chunk takes. Each run prints the server's CPU per request (from ``/proc``)
beside the client's, so which side is the limit shows. (An asyncio front end
for the same handler, tried in place of the threads, did no better on this
shared machine: its one process gets less CPU than 256 runnable threads.)

Default delays 2.0, 0.5 and 0.1 s: 128, 512 and 2560 requests/s ideal. At
2560/s a client needing 0.4 ms per request and a server needing 0.3 ms already
want 1.8 cores: on this shared 2-core machine 0.1 s is where both saturate. A
real SGLang call (thousands of tokens) takes seconds to minutes, so real ideal
rates are far lower.

    .venv/bin/python bench/runner_bench.py                        # 256 in flight, 512 rollouts, at 2.0, 0.5, 0.1 s
    .venv/bin/python bench/runner_bench.py --delay 0.5 --keep-reference   # also the [] cleaner at 0.5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from freelm.backends.base import GenerateRequest
from freelm.backends.sglang import generate_payload
from freelm.data import Problem
from freelm.records import read_rollouts
from freelm.run.batch import run_batch
from freelm.run.components import build_components
from freelm.run.spec import RunSpec
from freelm.testing.engines import ScriptedEngine, ScriptedTokenizer
from freelm.testing.sglang_server import SGLangTestServer
from freelm.tokenizer import Tokenizer

_CASE = re.compile(r"Case (\d+) is checked\. ")
_DECODE = ScriptedEngine()


def reasoning(request) -> str:
    """The next numbered sentences after the last complete one in the context, enough to fill the chunk.

    Only the context's tail is read (the last complete sentence is within one
    chunk of the end) and only what the chunk takes is written: the server's
    CPU per request then stays that of the protocol, not of this script.
    """
    tail = request.input_ids[-(request.max_new_tokens + 64) :]
    numbers = _CASE.findall(_DECODE.decode(tail))
    last = int(numbers[-1]) if numbers else 0
    return "".join(f"Case {n} is checked. " for n in range(last + 1, last + 2 + request.max_new_tokens // 19))


def cleaning(request) -> str:
    """Delete every complete sentence of the thinking but the last (the one the reasoner continues from)."""
    thinking = request.text.rsplit("## Reasoning so far\n", 1)[-1]
    numbers = _CASE.findall(thinking)
    if len(numbers) < 2:
        return "[]"
    return json.dumps([{"prefix": f"Case {numbers[0]} is", "suffix": f"Case {numbers[-2]} is checked. "}])


#: KV tokens of the bench server: more than a run inserts (4096 requests of < 2k tokens), so nothing is evicted.
_KV_TOKENS = 1 << 23


def serve(delay: float, deleting: bool) -> None:
    """Child process: the scripted endpoint; prints its URL, serves until killed."""
    engine = ScriptedEngine({None: reasoning, "free": cleaning if deleting else "[]"}, delay=delay)
    with SGLangTestServer(engine, kv_capacity=_KV_TOKENS) as server:
        print(server.url, flush=True)
        while True:
            time.sleep(3600)


class Recorder:
    """An endpoint's backend that keeps every request it sends, for the minimal client to replay."""

    def __init__(self, backend, sent: list[GenerateRequest]):
        self.backend, self.sent = backend, sent

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    async def generate(self, request: GenerateRequest):
        self.sent.append(request)
        return await self.backend.generate(request)


def server_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _per_request_ms(before: float | None, after: float | None, requests: int) -> float | None:
    return None if before is None or after is None else round(1000 * (after - before) / max(requests, 1), 3)


async def bench(url: str, args: argparse.Namespace, out: Path, sent: list[GenerateRequest]) -> dict:
    """One runner batch against ``url``; every request it sends is appended to ``sent``."""
    spec = RunSpec.from_argv(
        [
            "--data", "unused", "--output", str(out), "--endpoint", url, "--n-rollouts", "1", "--no-progress",
            "--clean-every", str(args.clean_every), "--max-tokens", str(args.clean_every * args.rounds),
            "--context-limit", "8192", "--concurrency", str(args.concurrency), "--timeout", "60",
        ]
    )  # fmt: skip
    components = build_components(spec, tokenizer=Tokenizer(ScriptedTokenizer()))
    for pool in components.pools:
        for endpoint in pool.endpoints:
            endpoint.backend = Recorder(endpoint.backend, sent)
    problems = [
        Problem(id=str(i), source="bench", prompt=f"Problem {i}: how many cases?", answer="0")
        for i in range(args.problems)
    ]
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        summary = await run_batch(problems, spec, components)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await components.aclose()
    requests = sum(e.requests for pool in components.pools for e in pool.endpoints)
    achieved = requests / wall
    ideal = args.concurrency / args.delay
    cleans = [r.clean for rec in read_rollouts(out) for r in rec.rounds if r.clean is not None]
    return {
        "cleaning_rounds": len(cleans),
        "rounds_with_deletions": sum(bool(c.deleted_spans) for c in cleans),
        "tokens_deleted": sum(c.tokens_deleted for c in cleans),
        "rollouts": summary.done,
        "failed": summary.failed,
        "requests": requests,
        "requests_per_rollout": requests / max(summary.done, 1),
        "wall_s": round(wall, 3),
        "client_cpu_ms_per_request": round(1000 * cpu / max(requests, 1), 3),
        "delay_s": args.delay,
        "concurrency": args.concurrency,
        "achieved_rps": round(achieved, 1),
        "ideal_rps": round(ideal, 1),
        "ratio": round(achieved / ideal, 3),
    }


async def minimal(url: str, concurrency: int, sent: list[GenerateRequest]) -> dict:
    """The runner's requests again, in its order, from ``concurrency`` aiohttp workers posting and parsing: the reference."""
    bodies = iter([generate_payload(request) for request in sent])

    async def worker(session: aiohttp.ClientSession) -> None:
        for body in bodies:  # shared: each worker takes the next body
            async with session.post(f"{url}/generate", json=body) as response:
                response.raise_for_status()
                await response.json()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    total = len(sent)
    return {"requests": total, "wall_s": round(wall, 3), "client_cpu_ms_per_request": round(1000 * cpu / total, 3)}


def measure(delay: float, cleaner: str, args: argparse.Namespace) -> dict:
    """The runner (and, for the deleting cleaner, the minimal client) against a fresh server of ``delay`` seconds."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", cleaner, "--delay", str(delay)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = server.stdout.readline().strip()
        sent: list[GenerateRequest] = []
        with tempfile.TemporaryDirectory() as tmp:
            cpu_before = server_cpu_s(server.pid)
            result = asyncio.run(
                bench(url, argparse.Namespace(**{**vars(args), "delay": delay}), Path(tmp) / "o.jsonl", sent)
            )
            cpu_between = server_cpu_s(server.pid)
        result["server_cpu_ms_per_request"] = _per_request_ms(cpu_before, cpu_between, result["requests"])
        if cleaner == "delete":
            ref = asyncio.run(minimal(url, args.concurrency, sent))
            ref["server_cpu_ms_per_request"] = _per_request_ms(cpu_between, server_cpu_s(server.pid), len(sent))
            ref["ratio"] = round(ref["requests"] / ref["wall_s"] / result["ideal_rps"], 3)
            result["minimal_aiohttp"] = ref
        return result
    finally:
        server.kill()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--delay", type=float, nargs="+", default=[2.0, 0.5, 0.1], help="server seconds per request (one run each)"
    )
    parser.add_argument(
        "--keep-reference", action="store_true", help="also run the cleaner that answers [] (no deletions) per delay"
    )
    parser.add_argument("--concurrency", type=int, default=256, help="rollouts in flight")
    parser.add_argument("--problems", type=int, default=512, help="rollouts in total (one per problem)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="reasoning chunks per rollout (each followed by a cleaning call)"
    )
    parser.add_argument("--clean-every", type=int, default=64, help="tokens (bytes) per reasoning chunk")
    parser.add_argument("--serve", choices=("delete", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.delay[0], deleting=args.serve == "delete")
        return 0
    ok = True
    for delay in args.delay:
        results = {c: measure(delay, c, args) for c in ("delete", "keep") if c == "delete" or args.keep_reference}
        print(json.dumps(results, indent=2))
        d, m = results["delete"], results["delete"]["minimal_aiohttp"]
        print(
            f"delay {delay}s, {args.concurrency} in flight, ideal {d['ideal_rps']} requests/s: "
            f"runner {d['achieved_rps']} (ratio {d['ratio']:.3f}, CPU ms/request client {d['client_cpu_ms_per_request']} "
            f"server {d['server_cpu_ms_per_request']}, {d['rounds_with_deletions']}/{d['cleaning_rounds']} rounds "
            f"deleted {d['tokens_deleted']} tokens); minimal aiohttp client ratio {m['ratio']:.3f} (client "
            f"{m['client_cpu_ms_per_request']}, server {m['server_cpu_ms_per_request']}); "
            f"runner / minimal {d['ratio'] / m['ratio']:.3f}",
            flush=True,
        )
        if "keep" in results:
            k = results["keep"]
            print(
                f"  reference, cleaner answers []: ratio {k['ratio']:.3f}, client CPU {k['client_cpu_ms_per_request']} "
                f"ms/request; deleting / reference CPU per request "
                f"{d['client_cpu_ms_per_request'] / k['client_cpu_ms_per_request']:.3f}x"
            )
            ok = ok and k["failed"] == 0
        ok = ok and d["failed"] == 0 and d["rounds_with_deletions"] > 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
