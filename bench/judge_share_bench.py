#!/usr/bin/env python3
"""Two judge processes on one cache: requests sent and wall time, against one judge alone on the same answers.

A scripted OpenAI-compatible judge on 127.0.0.1 answers every request after
``--latency`` seconds (a judge model's think time; requests are served
concurrently). ``--answers`` distinct answers are judged first by one
``llm_judge.py`` process on a fresh cache (the reference), then by two started
together on one fresh cache. Printed: requests sent (each answer once means
``--answers``; judges that do not share a cache send twice that), cache lines,
and the judging time of the pair vs the single judge, seen from the server:
first request received to last reply sent (sharing the work, the pair should
take about half; start-up, mostly imports, is left out: on a loaded machine
it varies by more than the judging takes). Wall times are printed too.

    python bench/judge_share_bench.py [--answers 160] [--latency 1.0] [--concurrency 4]

To measure another version of the judge, put its checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from freelm.testing.openai_chat_server import OpenAIChatTestServer

CANDIDATE = re.compile(r"Candidate's final answer:\n(.*?)\n\nExplain", re.S)


def judges(server: OpenAIChatTestServer, run: Path, output: Path, count: int, concurrency: int) -> float:
    """Start ``count`` judges on ``output`` at once; wall seconds until the last one exits."""
    command = [
        sys.executable, "-m", "freelm.cli", "judge", "--input", str(run), "--base-url", server.base_url,
        "--model", "judge", "--output", str(output), "--concurrency", str(concurrency), "--no-progress",
    ]  # fmt: skip
    started = time.perf_counter()
    # run from the temp dir: freelm comes from PYTHONPATH (another version) or the installed checkout
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=run.parent) for _ in range(count)]
    for p in processes:
        if p.wait() != 0:
            raise SystemExit(f"a judge failed: {p.stderr.read()}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=160)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the scripted judge takes per reply")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight per judge process")
    args = parser.parse_args()

    arrivals: list[float] = []

    def verdict(body) -> str:
        arrivals.append(time.perf_counter())
        time.sleep(args.latency)
        answer = CANDIDATE.search(body["messages"][0]["content"]).group(1)
        return "\\boxed{Correct}" if answer == "7" else "\\boxed{Incorrect}"

    def judging_span(first: int) -> float:
        return arrivals[-1] + args.latency - arrivals[first]

    with tempfile.TemporaryDirectory() as tmp, OpenAIChatTestServer(verdict, model="judge") as server:
        run = Path(tmp) / "run.jsonl"
        run.write_text("".join(
            json.dumps({"id": "1", "source": "s", "rollout": i, "answer": "7", "prompt": "What is 3+4?",
                        "response": f"</think> \\boxed{{{i}}}"}) + "\n"
            for i in range(args.answers)
        ))  # fmt: skip
        alone = judges(server, run, Path(tmp) / "alone.jsonl", 1, args.concurrency)
        alone_requests, alone_span = len(server.bodies), judging_span(0)
        shared_cache = Path(tmp) / "shared.jsonl"
        pair = judges(server, run, shared_cache, 2, args.concurrency)
        pair_requests, pair_span = len(server.bodies) - alone_requests, judging_span(alone_requests)
        lines = len(shared_cache.read_text().splitlines())
    print(
        f"{args.answers} distinct answers, judge latency {args.latency:g} s, {args.concurrency} requests in flight "
        "per judge"
    )
    print(f"one judge alone:       {alone_requests} requests, judging {alone_span:.1f} s (wall {alone:.1f} s)")
    print(
        f"two judges, one cache: {pair_requests} requests ({pair_requests / args.answers:.2f} per answer), "
        f"{lines} cache lines, judging {pair_span:.1f} s (wall {pair:.1f} s) = {pair_span / alone_span:.2f}x "
        "the single judge's judging time"
    )


if __name__ == "__main__":
    main()
