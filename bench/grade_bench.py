#!/usr/bin/env python3
"""Grade 10,000 realistic responses built from the shared benchmarks; print answers/s and timeouts.

Responses mimic model outputs: a think block (with a draft box), then the
answer in one of several forms: the exact ground truth, an equivalent rewrite
(leading zeros, \\dfrac, \\text{}, degrees, decimals), a near miss (off by one,
a neighbour problem's answer), or no box at all. The reference rate is the
single-process sequential math-verify rate measured in the same run on a random
sample of the same responses, warm: math-verify is imported and has graded one
pair before the clock starts (its first import alone takes ~0.5 s, which would
flatter the ratio). The pool's time includes starting its workers, as every
real grading run pays it. The ratio says what the pool + quick path + dedup buy
on this machine.

    python bench/grade_bench.py [--responses 10000] [--workers 2] [--reference-sample 500]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

from freelm.data import load_problems
from freelm.evaluation.extract import extract_answer
from freelm.evaluation.grade import GraderPool, grade_pairs, math_verify_grade

BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"


def variant(gold: str, other: str, rng: random.Random) -> str | None:
    """One final answer as a model might write it (None: forgets the box)."""
    kind = rng.choices(["exact", "equivalent", "near", "other", "none"], weights=[45, 20, 15, 15, 5])[0]
    if kind == "none":
        return None
    if kind == "other":
        return other
    if gold.isdigit():
        n = int(gold)
        if kind == "near":
            return str(n + rng.choice([-1, 1, 10]))
        return rng.choice([f"{n:03d}", f"{n}.0", f"\\text{{{n}}}", f"{n}^\\circ"]) if kind == "equivalent" else gold
    if kind == "equivalent":
        return rng.choice([gold.replace("\\frac", "\\dfrac"), f"\\text{{ }}{gold}", f" {gold} ", f"${gold}$"])
    if kind == "near":
        return gold + rng.choice(["+1", "-1", "^2", "/2"])
    return gold


def build_responses(n: int, benchmarks: Path, seed: int = 0) -> list[tuple[str, str]]:
    problems = [p for f in sorted(benchmarks.glob("*.jsonl")) for p in load_problems(f)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = problems[i % len(problems)]
        other = problems[(i * 7 + 3) % len(problems)].answer
        final = variant(p.answer, other, rng)
        tail = "I could not finish." if final is None else f"Therefore the answer is $\\boxed{{{final}}}$."
        response = f"Let me work through this.\nDraft: \\boxed{{0}}\n...\n</think>\n\n{tail}"
        out.append((p.answer, response))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0, help="CPU seconds per answer (GraderPool.timeout_s)")
    parser.add_argument("--benchmarks", type=Path, default=BENCHMARKS, help="directory of benchmark JSONL files")
    parser.add_argument("--reference-sample", type=int, default=500, help="pairs graded sequentially in-process")
    args = parser.parse_args()
    if not args.benchmarks.is_dir():
        print(f"shared benchmarks not found at {args.benchmarks} (pass --benchmarks DIR)")
        return 2
    responses = build_responses(args.responses, args.benchmarks)
    pairs = [(gold, extract_answer(text).answer) for gold, text in responses]

    start = time.perf_counter()
    with GraderPool(args.workers, timeout_s=args.timeout) as pool:
        grades = grade_pairs(pairs, pool)
        restarts = pool.restarts
    elapsed = time.perf_counter() - start
    methods = Counter(grades[p].method for p in pairs)
    correct = sum(grades[p].correct for p in pairs)

    # reference: plain sequential math-verify on every pair of a sample (no dedup, no quick path)
    answered = [p for p in pairs if p[1] is not None]
    sample = random.Random(1).sample(answered, min(args.reference_sample, len(answered)))
    warm_start = time.perf_counter()
    math_verify_grade("\\frac{1}{2}", "0.5")  # warm-up: the import and the parser's set-up are not per-answer costs
    warm_up = time.perf_counter() - warm_start
    ref_start = time.perf_counter()
    for gold, answer in sample:
        math_verify_grade(gold, answer)
    ref_rate = len(sample) / (time.perf_counter() - ref_start)

    rate = len(pairs) / elapsed
    print(f"responses graded: {len(pairs)} ({len(set(pairs))} distinct pairs) in {elapsed:.1f} s")
    print(f"throughput: {rate:.0f} answers/s with {args.workers} workers")
    print(
        f"reference: {ref_rate:.0f} answers/s sequential math-verify (warm) on {len(sample)} pairs; "
        f"ratio {rate / ref_rate:.1f}x (its first call, {warm_up:.2f} s of import and set-up, not counted)"
    )
    print(f"timeouts: {methods.get('timeout', 0)}  errors: {methods.get('error', 0)}  worker restarts: {restarts}")
    print(f"grade methods: {dict(methods)}; graded correct: {correct / len(pairs):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
