"""Runner throughput against a model-free SGLang-protocol endpoint that answers every request after a fixed delay.

What it measures: the client side of ``freelm run`` (asyncio loop, EndpointPool,
the SGLang httpx client, the reasoning/cleaning loop with its deletions and
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
the runner, a minimal aiohttp client (``concurrency`` workers posting the same
``/generate`` body in a loop, nothing else) is measured against the same server
in the same invocation: what any Python client reaches on this machine.

Default delays 2.0, 0.5 and 0.1 s: 128, 512 and 2560 requests/s ideal. Why not 50 ms (5120/s): on
this shared 2-core machine one request costs the client ~1.5-2 ms of CPU, almost
all inside httpx/httpcore/anyio, and the test server ~1 ms; 128/s keeps client +
server well under one core even when other jobs take the rest. A real SGLang
call (thousands of tokens) takes seconds to minutes, so real ideal rates are far
lower still.

    .venv/bin/python bench/runner_bench.py                        # 256 in flight, 512 rollouts, at 2.0, 0.5, 0.1 s
    .venv/bin/python bench/runner_bench.py --delay 0.5 --keep-reference   # also the [] cleaner at 0.5 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    """The next numbered sentences after the last complete one in the context (more than any chunk takes)."""
    numbers = [int(n) for n in _CASE.findall(_DECODE.decode(request.input_ids))]
    last = numbers[-1] if numbers else 0
    return "".join(f"Case {n} is checked. " for n in range(last + 1, last + 40))


def cleaning(request) -> str:
    """Delete every complete sentence of the thinking but the last (the one the reasoner continues from)."""
    thinking = request.text.rsplit("## Reasoning so far\n", 1)[-1]
    numbers = _CASE.findall(thinking)
    if len(numbers) < 2:
        return "[]"
    return json.dumps([{"prefix": f"Case {numbers[0]} is", "suffix": f"Case {numbers[-2]} is checked. "}])


def serve(delay: float, deleting: bool) -> None:
    """Child process: the scripted endpoint; prints its URL, serves until killed."""
    engine = ScriptedEngine({None: reasoning, "free": cleaning if deleting else "[]"}, delay=delay)
    with SGLangTestServer(engine) as server:
        print(server.url, flush=True)
        while True:
            time.sleep(3600)


async def bench(url: str, args: argparse.Namespace, out: Path) -> dict:
    spec = RunSpec.from_argv(
        [
            "--data", "unused", "--output", str(out), "--endpoint", url, "--n-rollouts", "1", "--no-progress",
            "--clean-every", str(args.clean_every), "--max-tokens", str(args.clean_every * args.rounds),
            "--context-limit", "8192", "--concurrency", str(args.concurrency), "--timeout", "60",
        ]
    )  # fmt: skip
    components = build_components(spec, tokenizer=Tokenizer(ScriptedTokenizer()))
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


async def minimal(url: str, concurrency: int, total: int) -> dict:
    """``total`` requests from ``concurrency`` aiohttp workers, each posting and parsing in a loop: the reference."""
    body = generate_payload(GenerateRequest(input_ids=_DECODE.encode("Problem 0: how many cases?"), max_new_tokens=64))
    left = total

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.post(f"{url}/generate", json=body) as response:
                response.raise_for_status()
                await response.json()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"requests": total, "wall_s": round(wall, 3), "client_cpu_ms_per_request": round(1000 * cpu / total, 3)}


def measure(delay: float, cleaner: str, args: argparse.Namespace) -> dict:
    """The runner (and, for the deleting cleaner, the minimal client) against a fresh server of ``delay`` seconds."""
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", cleaner, "--delay", str(delay)], stdout=subprocess.PIPE, text=True
    )
    try:
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            result = asyncio.run(
                bench(url, argparse.Namespace(**{**vars(args), "delay": delay}), Path(tmp) / "o.jsonl")
            )
        if cleaner == "delete":
            ref = asyncio.run(minimal(url, args.concurrency, result["requests"]))
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
            f"delay {delay}s, {args.concurrency} in flight, ideal {d['ideal_rps']} requests/s: runner {d['achieved_rps']} "
            f"(ratio {d['ratio']:.3f}, client CPU {d['client_cpu_ms_per_request']} ms/request, "
            f"{d['rounds_with_deletions']}/{d['cleaning_rounds']} rounds deleted {d['tokens_deleted']} tokens); "
            f"minimal aiohttp client ratio {m['ratio']:.3f} ({m['client_cpu_ms_per_request']} ms/request); "
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
