"""Free()LM / vanilla time per resume strategy on the embedded default, the reference measured in the same rounds.

Each round runs the demo's settings (in-process backend, 16 rollouts in flight,
greedy, ``clean_every=32``) at one context limit four ways, each on an engine
of its own: vanilla (the reference) and Free()LM resuming by ``reprefill``,
``evict-gaps`` and ``evict-rerotate`` (docs/free.md). The order rotates from
round to round so that a load change on a shared machine does not always hit
the same run. Printed: per run the median wall and CPU time over the rounds
and the median of the per-round ratios to vanilla (per generated token, so a
run that writes more tokens is not charged for them), then what the engine
did: prefill tokens, reasoning tokens prefilled again, entries evicted and
re-rotated, forwards, peak KV.

    python bench/resume_strategies_bench.py [--problems 64] [--rounds 3] [--limit 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "freelm" / "assets" / "embedded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the four runs; medians are printed")
    parser.add_argument("--limit", type=int, default=512, help="context limit (512: vanilla and Free()LM alike)")
    parser.add_argument("--assets", type=Path, default=ASSETS)
    args = parser.parse_args()

    import torch

    from freelm.demo.strategies import STRATEGY_RUNS, measure, strategy_argv

    torch.set_num_threads(1)
    names = [name for name, _ in STRATEGY_RUNS]
    got: dict[str, list] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = STRATEGY_RUNS[round_ % len(STRATEGY_RUNS) :] + STRATEGY_RUNS[: round_ % len(STRATEGY_RUNS)]
            for name, strategy in order:
                out = Path(tmp) / f"{round_}-{name}.jsonl"
                measured, _, _ = measure(strategy_argv(args.assets, out, strategy, args.limit, args.problems))
                got[name].append(measured)
                print(
                    f"round {round_ + 1}: {name:15s} {measured.wall_s:6.2f} s wall, {measured.cpu_s:6.2f} s CPU, "
                    f"{measured.generated_tokens} tokens",
                    flush=True,
                )

    def ratios(name: str, attr: str) -> list[float]:
        """Per round: this run's time per generated token / vanilla's, in the same round."""
        return [
            (getattr(m, attr) / m.generated_tokens) / (getattr(v, attr) / v.generated_tokens)
            for m, v in zip(got[name], got["vanilla"], strict=True)
        ]

    print(f"\n{args.problems} problems, context limit {args.limit}, medians of {args.rounds} rounds (1 thread)")
    print(f"{'run':15s} {'wall s':>7s} {'CPU s':>7s} {'tokens':>7s} {'wall / vanilla':>15s} {'CPU / vanilla':>14s}")
    for name in names:
        runs = got[name]
        print(
            f"{name:15s} {statistics.median(m.wall_s for m in runs):7.2f} "
            f"{statistics.median(m.cpu_s for m in runs):7.2f} {runs[0].generated_tokens:7d} "
            f"{statistics.median(ratios(name, 'wall_s')):14.2f}x {statistics.median(ratios(name, 'cpu_s')):13.2f}x"
        )
    print("\nwhat the engine did (the same in every round: greedy decoding):")
    print(
        f"{'run':15s} {'prefill (reasoning + cleaning)':>31s} {'re-prefilled':>12s} {'evicted':>8s} "
        f"{'re-rotated':>10s} {'forwards':>8s} {'peak KV decoded':>15s} {'peak KV held':>12s}"
    )
    for name in names:
        m = got[name][0]
        print(
            f"{name:15s} {f'{m.reasoning_prefill_tokens} + {m.cleaning_prefill_tokens}':>31s} "
            f"{m.reprefilled_tokens:12d} {m.evicted_tokens:8d} {m.rerotated_tokens:10d} {m.forwards:8d} "
            f"{m.peak_live_kv:15d} {m.peak_held_kv:12d}"
        )
    for name in names[2:]:
        print(
            f"{name} / reprefill, same round: wall {statistics.median(_per_round(got, name, 'wall_s')):.2f}x, "
            f"CPU {statistics.median(_per_round(got, name, 'cpu_s')):.2f}x"
        )


def _per_round(got: dict[str, list], name: str, attr: str) -> list[float]:
    return [getattr(m, attr) / getattr(r, attr) for m, r in zip(got[name], got["reprefill"], strict=True)]


if __name__ == "__main__":
    main()
