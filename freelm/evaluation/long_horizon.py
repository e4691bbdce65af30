"""Select the long-horizon subset: problems whose vanilla rollouts run past a token threshold.

``python -m freelm.evaluation.long_horizon --vanilla V.jsonl --data B1.jsonl ... --threshold 80000 --out-dir D``
writes ``D/problems.jsonl`` (the selected problems, for a Free()LM rerun) and
``D/vanilla.jsonl`` (the vanilla rollouts of those problems, for the comparison).
A problem is selected when the MEAN generated tokens of its vanilla rollouts
reach the threshold (``--rule any``: when any rollout does).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from freelm.data import load_problems
from freelm.jsonl import write_jsonl
from freelm.records import read_rollouts


def select_problems(records, threshold: int, rule: str = "mean") -> set[tuple[str, str]]:
    tokens: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in records:
        tokens[(r.source, r.id)].append(r.generated_tokens)
    pick = (lambda v: sum(v) / len(v) >= threshold) if rule == "mean" else (lambda v: max(v) >= threshold)
    return {key for key, v in tokens.items() if pick(v)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vanilla", type=Path, required=True, help="vanilla runner output")
    parser.add_argument("--data", nargs="+", required=True, help="benchmark JSONL files the run used")
    parser.add_argument("--threshold", type=int, default=80000, help="generated tokens (paper: 80k)")
    parser.add_argument("--rule", choices=("mean", "any"), default="mean")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        records = read_rollouts(args.vanilla)
        problems = [p for path in args.data for p in load_problems(path)]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    chosen = select_problems(records, args.threshold, args.rule)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        args.out_dir / "problems.jsonl",
        (
            {"id": p.id, "source": p.source, "prompt": p.prompt, "answer": p.answer, **p.extra}
            for p in problems
            if p.key in chosen
        ),
    )
    write_jsonl(args.out_dir / "vanilla.jsonl", (r.to_dict() for r in records if (r.source, r.id) in chosen))
    total = len({(r.source, r.id) for r in records})
    print(f"{len(chosen)} of {total} problems reach {args.threshold} generated tokens ({args.rule})", file=sys.stderr)
    return 0 if chosen else 1


if __name__ == "__main__":
    sys.exit(main())
