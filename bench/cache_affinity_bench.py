"""Prefix-cache hits of a run over 1, 2 and 4 stand-in SGLang endpoints, with and without rollout affinity.

What it measures: for every reasoning and cleaning call after a rollout's first
one (per adapter), the tokens the server reported cached (``cached_tokens``,
from the stand-in's SGLang radix cache, ``freelm/testing/radix_cache.py``)
against the ideal: what a server holding only that rollout's own earlier
requests would have cached (the same calls replayed through a private radix
cache of unbounded capacity). A hit beyond the ideal (a prompt header shared
with another rollout) is not counted: the question is whether the rollout's
own prefix was where its call went.

Two regimes: ``steady`` (more rollouts in flight than endpoints, 32) and
``under`` (fewer, 3: a small run, or the tail of any run, where least-loaded
ties rotate). Each runs twice in the same invocation: the pool's affinity off
(``EndpointPool.affinity = False``: least-loaded only, the reference) and on.
The workload is ``bench/runner_bench.py``'s: numbered sentences, a cleaner
that deletes all but the last.

    .venv/bin/python bench/cache_affinity_bench.py
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

from runner_bench import cleaning, reasoning  # the same workload (bench/ is the script's directory)

from freelm.backends.base import GenerateRequest, GenerateResult
from freelm.data import Problem
from freelm.records import read_rollouts
from freelm.run.batch import run_batch
from freelm.run.components import build_components
from freelm.run.spec import RunSpec
from freelm.testing.engines import ScriptedEngine, ScriptedTokenizer
from freelm.testing.radix_cache import RadixCache
from freelm.testing.sglang_server import SGLangTestServer
from freelm.tokenizer import Tokenizer

_PROBLEM = re.compile(r"Problem (\d+):")
_ENGINE = ScriptedEngine()


class Recorder:
    """An endpoint's backend, logging (problem, request, result) of every successful call."""

    def __init__(self, backend, log: list):
        self._backend = backend
        self._log = log

    def __getattr__(self, name):
        return getattr(self._backend, name)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await self._backend.generate(request)
        text = request.text if request.text is not None else _ENGINE.decode(request.input_ids)
        self._log.append((_PROBLEM.search(text).group(1), request, result))
        return result


def hits(log: list) -> dict[str, list[int]]:
    """[cached, ideal] tokens per kind, over every call but each rollout's first per adapter."""
    caches: dict[str, RadixCache] = defaultdict(lambda: RadixCache(1 << 40))
    totals = {"reasoning": [0, 0], "cleaning": [0, 0]}
    for problem, request, result in log:
        ids = list(request.input_ids) if request.input_ids is not None else _ENGINE.encode(request.text)
        ideal = caches[problem].match(request.adapter, ids)
        caches[problem].insert(request.adapter, ids + result.output_ids[:-1])
        if ideal:
            kind = "reasoning" if request.adapter is None else "cleaning"
            totals[kind][0] += min(result.cached_tokens or 0, ideal)
            totals[kind][1] += ideal
    return totals


async def run(urls: list[str], concurrency: int, problems: int, affinity: bool, args, out: Path) -> dict:
    endpoints = [flag for url in urls for flag in ("--endpoint", url)]
    spec = RunSpec.from_argv(
        [
            "--data", "unused", "--output", str(out), *endpoints, "--n-rollouts", "1", "--no-progress",
            "--clean-every", str(args.clean_every), "--max-tokens", str(args.clean_every * args.rounds),
            "--context-limit", "8192", "--concurrency", str(concurrency), "--timeout", "60",
        ]
    )  # fmt: skip
    components = build_components(spec, tokenizer=Tokenizer(ScriptedTokenizer()))
    log: list = []
    for pool in components.pools:
        pool.affinity = affinity
        for endpoint in pool.endpoints:
            endpoint.backend = Recorder(endpoint.backend, log)
    jobs = [
        Problem(id=str(i), source="bench", prompt=f"Problem {i}: how many cases?", answer="0") for i in range(problems)
    ]
    try:
        await run_batch(jobs, spec, components)
    finally:
        await components.aclose()
    records = read_rollouts(out)
    same = sum(r.clean.endpoint == r.endpoint for rec in records for r in rec.rounds if r.clean and r.clean.endpoint)
    cleans = sum(bool(r.clean and r.clean.endpoint) for rec in records for r in rec.rounds)
    return {"hits": hits(log), "clean_on_reasoning_server": (same, cleans), "rollouts": len(records)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.02, help="server seconds per request")
    parser.add_argument("--rounds", type=int, default=4, help="reasoning chunks per rollout")
    parser.add_argument("--clean-every", type=int, default=64, help="tokens (bytes) per reasoning chunk")
    args = parser.parse_args()
    regimes = {"steady": (32, 96), "under": (3, 12)}  # (rollouts in flight, rollouts in all)
    worst = 1.0
    for n in (1, 2, 4):
        with ExitStack() as stack:
            servers = [
                stack.enter_context(
                    SGLangTestServer(ScriptedEngine({None: reasoning, "free": cleaning}, delay=args.delay))
                )
                for _ in range(n)
            ]
            urls = [s.url for s in servers]
            for regime, (concurrency, problems) in regimes.items():
                line = []
                for affinity in (False, True):
                    for server in servers:
                        server.cache.clear()
                    with tempfile.TemporaryDirectory() as tmp:
                        started = time.perf_counter()
                        r = asyncio.run(run(urls, concurrency, problems, affinity, args, Path(tmp) / "out.jsonl"))
                    ratios = {k: c / i if i else 1.0 for k, (c, i) in r["hits"].items()}
                    if affinity:
                        worst = min(worst, *ratios.values())
                    same, cleans = r["clean_on_reasoning_server"]
                    line.append(
                        f"{'after ' if affinity else 'before'}: reasoning {ratios['reasoning']:.3f} "
                        f"cleaning {ratios['cleaning']:.3f} of ideal, {same}/{cleans} cleaning calls on the "
                        f"rollout's reasoning server ({r['rollouts']} rollouts, {time.perf_counter() - started:.1f}s)"
                    )
                print(f"{n} endpoint(s), {regime} ({concurrency} in flight): " + "; ".join(line), flush=True)
    print(f"worst ratio with affinity: {worst:.3f} (goal >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
