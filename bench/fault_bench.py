"""Completion and time of a run on faulty endpoints, relative to the same run on fault-free ones, default settings.

Three model-free SGLang-protocol servers (``freelm.testing.sglang_server`` with a
``ScriptedEngine`` that sleeps ``--delay`` then answers), each in its own
process, answer each generation request with an independent random fault:
HTTP 503 (``--p-5xx``), a connection closed without an answer (``--p-drop``),
a hang (``--p-hang``: accepted, never answered in time), a 200 whose body never
ends (``--p-endless``) or a well-formed reply with far more tokens than asked
(``--p-overlong``: 100,000). The client is the
runner's own path (``build_components`` + ``run_batch``) with every execution
setting at its default (retries, breaker, timeouts, concurrency), Free()LM
mode: ``--rounds`` reasoning chunks each followed by a cleaning call.

The same run first goes to three fault-free servers; the report is completion
(rollouts written / wanted) and the faulty wall time as a multiple of the
fault-free one. Goal: 100% completion, at most 3x the time.

    .venv/bin/python bench/fault_bench.py                  # 20% 5xx, 5% drops, 1% hangs, 60 rollouts
    .venv/bin/python bench/fault_bench.py --max-retries 3  # the old default, for comparison
    .venv/bin/python bench/fault_bench.py --p-endless 0.02 --p-overlong 0.02   # hostile replies too

Every round of every record is checked against its budget: ``rounds_over_budget``
counts rounds that claim more tokens than a chunk asks for (must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from freelm.data import Problem
from freelm.records import read_rollouts
from freelm.run.batch import run_batch
from freelm.run.components import build_components
from freelm.run.spec import RunSpec
from freelm.testing.engines import ScriptedEngine, ScriptedTokenizer
from freelm.testing.sglang_server import SGLangTestServer
from freelm.tokenizer import Tokenizer

REASONING_TEXT = "Let us try the next case and check it carefully. " * 8
CLEANING_TEXT = "[]"
HANG_S = 3600.0  # a hung request never answers within any client deadline
FAULTS_QUEUED = 100_000  # one per generation request the server may see
OVERLONG_TOKENS = 100_000  # an overlong reply: far past any chunk's budget, under its byte cap


def serve(args: argparse.Namespace) -> None:
    """Child process: one endpoint with a random fault drawn for each generation request; prints its URL."""
    engine = ScriptedEngine({None: REASONING_TEXT, "free": CLEANING_TEXT}, delay=args.delay)
    rng = random.Random(args.seed)
    with SGLangTestServer(engine) as server:
        for _ in range(FAULTS_QUEUED):  # the server takes one queued fault per request; delay 0 is "none"
            r = rng.random()
            if r < args.p_5xx:
                server.fail_next(503, "scripted overload")
            elif r < args.p_5xx + args.p_drop:
                server.drop_next()
            elif r < args.p_5xx + args.p_drop + args.p_hang:
                server.delay_next(HANG_S)
            elif r < args.p_5xx + args.p_drop + args.p_hang + args.p_endless:
                server.endless_body_next()
            elif r < args.p_5xx + args.p_drop + args.p_hang + args.p_endless + args.p_overlong:
                server.overlong_next(OVERLONG_TOKENS)
            else:
                server.delay_next(0.0)
        print(server.url, flush=True)
        while True:
            time.sleep(3600)


def start_servers(args: argparse.Namespace, faulty: bool) -> tuple[list[subprocess.Popen], list[str]]:
    procs, urls = [], []
    for i in range(args.endpoints):
        rates = [args.p_5xx, args.p_drop, args.p_hang, args.p_endless, args.p_overlong] if faulty else [0] * 5
        command = [sys.executable, __file__, "--serve", "--delay", str(args.delay), "--seed", str(args.seed + i)]
        for flag, rate in zip(("--p-5xx", "--p-drop", "--p-hang", "--p-endless", "--p-overlong"), rates):
            command += [flag, str(rate)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(proc)
        urls.append(proc.stdout.readline().strip())
    return procs, urls


async def one_run(urls: list[str], args: argparse.Namespace, out: Path) -> dict:
    flags = [
        "--data", "unused", "--output", str(out), "--n-rollouts", "1", "--no-progress", "--clean-every", str(args.clean_every),
        "--max-tokens", str(args.clean_every * args.rounds), "--context-limit", "8192",
    ]  # fmt: skip
    for url in urls:
        flags += ["--endpoint", url]
    if args.max_retries is not None:
        flags += ["--max-retries", str(args.max_retries)]
    spec = RunSpec.from_argv(flags)
    components = build_components(spec, tokenizer=Tokenizer(ScriptedTokenizer()))
    problems = [Problem(str(i), "bench", f"Problem {i}: how many cases?", "0") for i in range(args.rollouts)]
    try:
        started = time.perf_counter()
        summary = await run_batch(problems, spec, components)
        wall = time.perf_counter() - started
    finally:
        await components.aclose()
    pool = components.reasoner
    rounds = [r for record in read_rollouts(out) for r in record.rounds] if out.exists() else []
    return {
        "done": summary.done,
        "failed": summary.failed,
        "completion": summary.done / args.rollouts,
        "wall_s": round(wall, 2),
        "requests": sum(e.requests for e in pool.endpoints),
        "retries": pool.retries,
        "hangs_abandoned": pool.hangs,
        "max_retries": spec.max_retries,
        "rounds_over_budget": sum(r.generated_tokens > args.clean_every for r in rounds),
    }


def measure(args: argparse.Namespace, faulty: bool) -> dict:
    procs, urls = start_servers(args, faulty)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return asyncio.run(one_run(urls, args, Path(tmp) / "out.jsonl"))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=60)
    parser.add_argument("--endpoints", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.5, help="server seconds per request")
    parser.add_argument("--rounds", type=int, default=4, help="reasoning chunks per rollout (+ a cleaning call each)")
    parser.add_argument("--clean-every", type=int, default=16, help="tokens per reasoning chunk")
    parser.add_argument("--p-5xx", type=float, default=0.20)
    parser.add_argument("--p-drop", type=float, default=0.05)
    parser.add_argument("--p-hang", type=float, default=0.01)
    parser.add_argument("--p-endless", type=float, default=0.0, help="a 200 whose body never ends")
    parser.add_argument("--p-overlong", type=float, default=0.0, help=f"a reply of {OVERLONG_TOKENS:,} tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-retries", type=int, help="override the runner default (to compare)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return 0
    clean = measure(args, faulty=False)
    faulty = measure(args, faulty=True)
    ratio = faulty["wall_s"] / clean["wall_s"]
    print(json.dumps({"fault_free": clean, "faulty": faulty, "time_ratio": round(ratio, 2)}, indent=2))
    print(
        f"faults per request: {args.p_5xx:.0%} 5xx, {args.p_drop:.0%} dropped, {args.p_hang:.0%} hung, "
        f"{args.p_endless:.0%} endless, {args.p_overlong:.0%} overlong, {args.endpoints} endpoints; "
        f"completion {faulty['completion']:.0%} ({faulty['failed']} failed), "
        f"time {faulty['wall_s']}s vs {clean['wall_s']}s fault-free = {ratio:.2f}x; "
        f"rounds over budget {faulty['rounds_over_budget']}"
    )
    return 0 if faulty["failed"] == 0 and ratio <= 3 and faulty["rounds_over_budget"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
