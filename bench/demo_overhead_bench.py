"""Free()LM's overhead over vanilla on the embedded demo, with and without KV reuse across batched waves.

Runs the demo's runner settings (in-process backend, 16 rollouts in flight,
greedy, ``clean_every=32``) at the context limit where vanilla and Free()LM
generate the same tokens (512), three ways in the same process: vanilla (the
reference), Free()LM with every wave prefilled from scratch (``cache_bytes=0``,
the backend before KV reuse) and Free()LM with each rollout's KV kept across
waves. Prints wall time per generated token relative to vanilla, whether the
two Free()LM runs wrote identical rollouts, and where Free()LM's extra time went
(cleaning prefill + decode, reasoning prefill, reasoning decode, the rest:
scheduling, executor, tokenizer) from the backend's own timers.

    python bench/demo_overhead_bench.py [--problems 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "freelm" / "assets" / "embedded"
VARIANTS = (
    ("vanilla", "vanilla", "continuous"),
    ("vanilla, waves", "vanilla", "waves"),
    ("freelm, waves", "freelm", "waves"),
    ("freelm, continuous", "freelm", "continuous"),
)


def run_variant(assets: Path, out: Path, mode: str, scheduling: str, problems: int, limit: int) -> dict:
    from freelm.data import load_problem_sources
    from freelm.demo.run import runner_args
    from freelm.records import read_rollouts
    from freelm.run.batch import run_batch
    from freelm.run.components import build_components
    from freelm.run.spec import RunSpec

    cleaner = None if mode == "vanilla" else "free"
    argv = runner_args(assets, assets / "benchmark.jsonl", out, cleaner, limit, problems)[1:]
    spec = RunSpec.from_argv([*argv, "--no-progress"])
    components = build_components(spec)
    backend = components.reasoner.endpoints[0].backend
    backend.scheduling = scheduling

    async def go():
        try:
            return await run_batch(load_problem_sources(list(spec.data), limit=spec.limit), spec, components)
        finally:
            await components.aclose()

    started = time.perf_counter()
    summary = asyncio.run(go())
    wall = time.perf_counter() - started
    records = sorted(read_rollouts(out), key=lambda r: r.key)
    return {
        "wall": wall,
        "tokens": summary.generated_tokens,
        "stats": dict(backend.stats),
        "steps": backend.step_stats,
        "records": records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three runs; the fastest of each is kept")
    parser.add_argument("--limit", type=int, default=512, help="context limit (512: both modes generate alike)")
    parser.add_argument("--assets", type=Path, default=ASSETS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, mode, scheduling in VARIANTS:
                out = Path(tmp) / f"{repeat}-{mode}-{scheduling}.jsonl"
                got = run_variant(args.assets, out, mode, scheduling, args.problems, args.limit)
                print(f"round {repeat + 1}: {name:26s} {got['wall']:6.2f} s  {got['tokens']} tokens", flush=True)
                if name not in best or got["wall"] < best[name]["wall"]:
                    best[name] = got
    vanilla = best["vanilla"]
    per_token = vanilla["wall"] / vanilla["tokens"]
    print(f"\n{args.problems} problems, context limit {args.limit}, fastest of {args.repeats} (greedy, 1 thread)")
    print(f"{'run':26s} {'wall s':>7s} {'tokens':>7s} {'ms/token':>9s} {'vs vanilla':>10s}")
    for name, _, _ in VARIANTS:
        got = best[name]
        ratio = (got["wall"] / got["tokens"]) / per_token
        print(
            f"{name:26s} {got['wall']:7.2f} {got['tokens']:7d} {1000 * got['wall'] / got['tokens']:9.2f} {ratio:9.2f}x"
        )
    fresh, kept = best["freelm, waves"], best["freelm, continuous"]
    same = sum(
        a.response == b.response and [r.generated_text for r in a.rounds] == [r.generated_text for r in b.rounds]
        for a, b in zip(fresh["records"], kept["records"], strict=True)
    )
    print(f"identical Free()LM rollouts with and without KV reuse: {same}/{len(kept['records'])}")
    print("\nwhere the time went (s; prefill = prompt tokens computed, cached = prompt tokens reused):")
    for name, _, _ in VARIANTS:
        got = best[name]
        parts = []
        for namespace, label in ((None, "reasoning"), ("free", "cleaning")):
            s = got["stats"].get(namespace)
            if s is not None:
                parts.append(
                    f"{label}: prefill {s.prefill_s:.2f} ({s.prefill_tokens} computed, {s.cached_tokens} cached), "
                    f"decode {s.decode_s:.2f} ({s.decode_tokens} tokens in {s.decode_steps} steps)"
                )
        model = sum(s.prefill_s + s.decode_s for s in got["stats"].values())
        steps = got["steps"]
        print(f"  {name}: " + "; ".join(parts) + f"; rest {got['wall'] - model:.2f}")
        if steps.decode_steps:
            print(
                f"    batch engine: {steps.decode_steps} decode steps (mean batch "
                f"{steps.rows_decoded / steps.decode_steps:.1f}) + {steps.prefill_forwards} prefill forwards "
                f"({steps.joined_prefilled} requests prefilled, {steps.joined_direct} joined a decode step directly), "
                f"model {steps.forward_s:.2f} s + engine bookkeeping {steps.step_s - steps.forward_s:.2f} s"
            )
    base = vanilla["stats"][None]
    for name in ("freelm, waves", "freelm, continuous"):
        got = best[name]
        reasoning, cleaning = got["stats"][None], got["stats"].get("free")
        extra = got["wall"] * vanilla["tokens"] / got["tokens"] - vanilla["wall"]  # at equal generated tokens
        clean = (cleaning.prefill_s + cleaning.decode_s) if cleaning else 0.0
        rest = got["wall"] - clean - reasoning.prefill_s - reasoning.decode_s
        print(
            f"extra time of {name}: {got['wall'] - vanilla['wall']:+.2f} s "
            f"({extra:+.2f} s at equal tokens) = cleaning {clean:.2f} "
            f"+ reasoning prefill {reasoning.prefill_s - base.prefill_s:+.2f} "
            f"+ reasoning decode {reasoning.decode_s - base.decode_s:+.2f} "
            f"+ rest {rest - (vanilla['wall'] - base.prefill_s - base.decode_s):+.2f}"
        )


if __name__ == "__main__":
    main()
