"""Free()LM's overhead over vanilla on the embedded demo: per-adapter waves vs continuous batching.

Runs the demo's runner settings (in-process backend, 16 rollouts in flight,
greedy, ``clean_every=32``) at the context limit where vanilla and Free()LM
generate the same tokens (512), four ways in the same process: vanilla with
the backend's default per-adapter waves (the reference) and with step-level
continuous batching (``scheduling="continuous"``), and Free()LM both ways.
Prints wall time per generated token relative to the reference, whether the
two schedulings wrote identical rollouts, the batch engine's forwards, and
where Free()LM's extra time went (cleaning decode, prefill, reasoning decode,
engine bookkeeping, the rest) from the backend's own timers.

    python bench/demo_overhead_bench.py [--problems 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "freelm" / "assets" / "embedded"
VARIANTS = (
    ("vanilla", "vanilla", "waves"),
    ("vanilla, continuous", "vanilla", "continuous"),
    ("freelm, waves", "freelm", "waves"),
    ("freelm, continuous", "freelm", "continuous"),
)


def run_variant(assets: Path, out: Path, mode: str, scheduling: str, problems: int, limit: int) -> dict:
    from freelm.demo.strategies import measure, strategy_argv

    argv = strategy_argv(assets, out, None if mode == "vanilla" else "reprefill", limit, problems)
    measured, records, backend = measure(argv, scheduling)
    return {
        "wall": measured.wall_s,
        "cpu": measured.cpu_s,
        "tokens": measured.generated_tokens,
        "stats": dict(backend.stats),
        "steps": backend.step_stats,
        "records": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the four runs; the fastest of each is kept")
    parser.add_argument("--limit", type=int, default=512, help="context limit (512: both modes generate alike)")
    parser.add_argument("--assets", type=Path, default=ASSETS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    best: dict[str, dict] = {}
    least_cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, mode, scheduling in VARIANTS:
                out = Path(tmp) / f"{repeat}-{mode}-{scheduling}.jsonl"
                got = run_variant(args.assets, out, mode, scheduling, args.problems, args.limit)
                print(
                    f"round {repeat + 1}: {name:20s} {got['wall']:6.2f} s wall, {got['cpu']:6.2f} s CPU, "
                    f"{got['tokens']} tokens",
                    flush=True,
                )
                if name not in best or got["wall"] < best[name]["wall"]:
                    best[name] = got
                least_cpu[name] = min(least_cpu.get(name, got["cpu"]), got["cpu"])
    vanilla = best["vanilla"]
    print(f"\n{args.problems} problems, context limit {args.limit}, fastest of {args.repeats} (greedy, 1 thread)")
    print("per generated token, relative to vanilla; CPU time (this process) is what a shared machine disturbs least")
    print(
        f"{'run':20s} {'wall s':>7s} {'tokens':>7s} {'ms/token':>9s} {'vs vanilla':>10s} {'CPU s':>7s} {'CPU vs':>7s}"
    )
    for name, _, _ in VARIANTS:
        got = best[name]
        ratio = (got["wall"] / got["tokens"]) / (vanilla["wall"] / vanilla["tokens"])
        cpu_ratio = (least_cpu[name] / got["tokens"]) / (least_cpu["vanilla"] / vanilla["tokens"])
        print(
            f"{name:20s} {got['wall']:7.2f} {got['tokens']:7d} {1000 * got['wall'] / got['tokens']:9.2f} "
            f"{ratio:9.2f}x {least_cpu[name]:7.2f} {cpu_ratio:6.2f}x"
        )
    for label, one, other in (
        ("vanilla", "vanilla", "vanilla, continuous"),
        ("Free()LM", "freelm, waves", "freelm, continuous"),
    ):
        same = sum(
            a.response == b.response and [r.generated_text for r in a.rounds] == [r.generated_text for r in b.rounds]
            for a, b in zip(best[one]["records"], best[other]["records"], strict=True)
        )
        print(f"identical {label} rollouts with per-adapter waves and continuous batching: {same}/{args.problems}")
    print("\nwhere the time went (s; model time of a shared step booked to each row's namespace by its share):")
    for name, _, _ in VARIANTS:
        got, steps = best[name], best[name]["steps"]
        parts = []
        for namespace, label in ((None, "reasoning"), ("free", "cleaning")):
            s = got["stats"].get(namespace)
            if s is not None:
                parts.append(
                    f"{label}: prefill {s.prefill_s:.2f} ({s.prefill_tokens} computed, {s.cached_tokens} cached), "
                    f"decode {s.decode_s:.2f} ({s.decode_tokens} tokens)"
                )
        print(f"  {name}: " + "; ".join(parts))
        print(
            f"    {steps.decode_steps} decode steps (mean batch {steps.rows_decoded / steps.decode_steps:.1f}) "
            f"+ {steps.prefill_forwards} prefill forwards ({steps.joined_prefilled} requests prefilled, "
            f"{steps.joined_direct} joined a decode step directly); model {steps.forward_s:.2f}, "
            f"engine bookkeeping {steps.step_s - steps.forward_s:.2f}, outside the engine {got['wall'] - steps.step_s:.2f}"
        )
    reference = split(vanilla)
    for name in ("freelm, waves", "freelm, continuous"):
        got = best[name]
        extra = got["wall"] * vanilla["tokens"] / got["tokens"] - vanilla["wall"]  # at equal generated tokens
        parts = {key: value - reference.get(key, 0.0) for key, value in split(got).items()}
        print(
            f"extra time of {name}: {got['wall'] - vanilla['wall']:+.2f} s ({extra:+.2f} s at equal tokens) = "
            + " + ".join(f"{key} {value:+.2f}" for key, value in parts.items())
        )


def split(got: dict) -> dict[str, float]:
    """A run's wall time in the parts Free()LM adds to: cleaning decode, re-prefill, reasoning decode, the rest."""
    reasoning, cleaning, steps = got["stats"][None], got["stats"].get("free"), got["steps"]
    return {
        "cleaning decode": cleaning.decode_s if cleaning else 0.0,
        "prefill (cleaning + reasoning)": reasoning.prefill_s + (cleaning.prefill_s if cleaning else 0.0),
        "reasoning decode": reasoning.decode_s,
        "engine bookkeeping": steps.step_s - steps.forward_s,
        "rest (loop, executor, tokenizer, scheduling)": got["wall"] - steps.step_s,
    }


if __name__ == "__main__":
    main()
