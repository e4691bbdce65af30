#!/usr/bin/env python3
"""Grade the same 40 answers many times with every core saturated; count verdicts that change with load.

The fixture (``tests/fixtures/eval/grading40.jsonl``: HMMT-style answers, all
graded by math-verify, none by the string quick path) is graded once as the
reference, with no extra load, then ``--runs`` times while ``--hogs`` busy-loop
processes (one per core by default) saturate the machine and the grader runs at
``nice --grader-nice`` (the low-priority one, as a grader behind training jobs
would be). Each grading is a fresh process with a fresh ``GraderPool`` (pool
start included in its time). Printed: the load, how many loaded runs gave
verdicts different from the reference and how many answers differed in each,
pass@1 per run, how many verdicts disagree with the fixture's own
``expected_correct`` (the reference can be wrong too: a loaded machine makes
any run a loaded run), and the time per run loaded vs the reference measured in
the same invocation.

    python bench/grade_load_bench.py [--runs 20] [--hogs 2] [--grader-nice 10] [--workers 2]

To measure another version of the grader, put its checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "eval" / "grading40.jsonl"


def grade_once(fixture: Path, workers: int) -> dict:
    """One grading of the fixture in this process (the child side)."""
    from freelm.evaluation.extract import extract_answer
    from freelm.evaluation.grade import GraderPool, grade_pairs

    rows = [json.loads(line) for line in fixture.read_text().splitlines() if line.strip()]
    pairs = [(row["answer"], extract_answer(row["response"]).answer) for row in rows]
    started = time.perf_counter()
    with GraderPool(workers) as pool:
        grades = grade_pairs(pairs, pool)
    return {
        "seconds": time.perf_counter() - started,
        "verdicts": [[grades[p].correct, grades[p].method, grades[p].reason] for p in pairs],
    }


def run_child(args: argparse.Namespace, nice: int) -> dict:
    command = [sys.executable, __file__, "--child", "--fixture", str(args.fixture), "--workers", str(args.workers)]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, preexec_fn=(lambda: os.nice(nice)) if nice else None
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="busy-loop processes (default: cores)")
    parser.add_argument("--grader-nice", type=int, default=10, help="niceness of the grading process")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(grade_once(args.fixture, args.workers)))
        return

    expected = [json.loads(line)["expected_correct"] for line in args.fixture.read_text().splitlines() if line]

    def wrong(verdicts) -> int:
        return sum(correct != want for (correct, _), want in zip(verdicts, expected))

    reference = run_child(args, 0)
    ref = [tuple(v[:2]) for v in reference["verdicts"]]
    print(
        f"reference (no extra load, load average {os.getloadavg()[0]:.1f}): {reference['seconds']:.1f} s, "
        f"pass@1 {sum(c for c, _ in ref) / len(ref):.1%} ({wrong(ref)} wrong), methods {sorted({m for _, m in ref})}"
    )
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
    runs, loads = [], []
    try:
        for i in range(args.runs):
            result = run_child(args, args.grader_nice)
            loads.append(os.getloadavg()[0])
            verdicts = [tuple(v[:2]) for v in result["verdicts"]]
            diff = [j for j, (a, b) in enumerate(zip(ref, verdicts)) if a != b]
            runs.append((result["seconds"], verdicts, diff))
            reasons = {result["verdicts"][j][2] for j in diff}
            print(
                f"run {i + 1:2d}: {result['seconds']:6.1f} s, pass@1 {sum(c for c, _ in verdicts) / len(verdicts):.1%} "
                f"({wrong(verdicts)} wrong), "
                f"{len(diff)} verdict(s) differ from the reference{': ' + str(sorted(reasons)) if diff else ''}",
                flush=True,
            )
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    changed = [r for r in runs if r[2]]
    distinct = {tuple(v) for _, v, _ in runs} | {tuple(ref)}
    mean_s = statistics.mean(s for s, _, _ in runs)
    print(
        f"load: {args.hogs} busy loops at nice 0, grader at nice {args.grader_nice}, "
        f"load average {min(loads):.1f}..{max(loads):.1f} on {os.cpu_count()} cores"
    )
    print(
        f"{len(runs)} loaded runs: {len(changed)} with verdicts different from the reference "
        f"({sum(len(r[2]) for r in runs)} answer-verdicts in all), {len(distinct)} distinct verdict set(s); "
        f"{sum(wrong(v) > 0 for _, v, _ in runs)} with a verdict other than the fixture's expected one "
        f"({sum(wrong(v) for _, v, _ in runs)} answer-verdicts)"
    )
    print(
        f"time per run: {mean_s:.1f} s loaded (min {min(s for s, _, _ in runs):.1f}, max "
        f"{max(s for s, _, _ in runs):.1f}) vs {reference['seconds']:.1f} s reference = "
        f"{mean_s / reference['seconds']:.1f}x"
    )


if __name__ == "__main__":
    main()
