"""Free()LM's three ways to resume after a deletion, measured side by side on the embedded default.

``freelm demo --resume-strategies`` adds, at each context limit, vanilla and
Free()LM under ``--resume reprefill``, ``evict-gaps`` and ``evict-rerotate``
(docs/free.md, "Resuming after a deletion"), each run in this process on an
engine of its own so that its counters are its own: pass@1, peak KV (what the
decoded requests held, and that plus the prefix cache), prefill tokens,
reasoning tokens prefilled again, forwards, wall and CPU time.
``bench/resume_strategies_bench.py`` repeats the same runs to time them.

The outputs are ordinary runner files; next to each, ``OUT.engine.json``
keeps what its run measured, so a second ``freelm demo`` prints the table
without running again.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: (run name, --resume strategy; None: vanilla)
STRATEGY_RUNS = (
    ("vanilla", None),
    ("reprefill", "reprefill"),
    ("evict-gaps", "evict-gaps"),
    ("evict-rerotate", "evict-rerotate"),
)


@dataclass
class Measured:
    """What one run cost the in-process engine, from its own counters and the records it wrote."""

    wall_s: float
    cpu_s: float  # this process: the engine runs in it (a shared machine disturbs it least)
    generated_tokens: int
    decode_steps: int
    prefill_forwards: int
    reasoning_prefill_tokens: int  # computed (a reused prefix is not)
    cleaning_prefill_tokens: int
    reprefilled_tokens: int  # reasoning tokens computed again after a deletion (sum of the rounds')
    evicted_tokens: int
    rerotated_tokens: int
    peak_live_kv: int  # most tokens whose KV the requests being decoded held at once
    peak_held_kv: int  # most held at once, the prefix cache's included
    kv_entry_bytes: int  # one token's KV over all layers

    @property
    def forwards(self) -> int:
        return self.decode_steps + self.prefill_forwards

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Measured:
        return cls(**json.loads(path.read_text()))


def engine_path(output: Path) -> Path:
    return Path(f"{output}.engine.json")


def measure(argv: list[str], scheduling: str = "waves") -> tuple[Measured, list[Any], Any]:
    """Run the runner flags ``argv`` (``--backend local``) in this process: what it cost, its records, its engine.

    ``scheduling`` is the engine's (:data:`freelm.backends.local.SCHEDULING`);
    the engine is returned closed, for its counters (``stats``, ``step_stats``).
    """
    from freelm.data import load_problem_sources
    from freelm.records import read_rollouts
    from freelm.run.batch import run_batch
    from freelm.run.components import build_components
    from freelm.run.spec import RunSpec

    spec = RunSpec.from_argv([*argv, "--no-progress"])
    components = build_components(spec)
    backend = components.reasoner.endpoints[0].backend
    backend.scheduling = scheduling

    async def go():
        try:
            return await run_batch(load_problem_sources(list(spec.data), limit=spec.limit), spec, components)
        finally:
            await components.aclose()

    started, cpu = time.perf_counter(), time.process_time()
    summary = asyncio.run(go())
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    records = sorted(read_rollouts(spec.output), key=lambda r: r.key)
    rounds = [r for record in records for r in record.rounds]
    steps, stats = backend.step_stats, backend.stats
    measured = Measured(
        wall_s=wall,
        cpu_s=cpu,
        generated_tokens=summary.generated_tokens,
        decode_steps=steps.decode_steps,
        prefill_forwards=steps.prefill_forwards,
        reasoning_prefill_tokens=stats[None].prefill_tokens,
        cleaning_prefill_tokens=stats["free"].prefill_tokens if "free" in stats else 0,
        reprefilled_tokens=sum(r.reprefilled_tokens or 0 for r in rounds),
        evicted_tokens=sum(r.evicted_tokens for r in rounds),
        rerotated_tokens=sum(r.rerotated_tokens for r in rounds),
        peak_live_kv=steps.peak_live_kv,
        peak_held_kv=steps.peak_held_kv,
        kv_entry_bytes=backend.kv_entry_bytes,
    )
    return measured, records, backend


def strategy_argv(assets: Path, output: Path, strategy: str | None, limit: int, problems: int) -> list[str]:
    """The demo's runner flags for vanilla (``strategy`` None) or Free()LM resuming by ``strategy``."""
    from freelm.demo.flags import runner_args

    argv = runner_args(
        assets, assets / "benchmark.jsonl", output, None if strategy is None else "free", limit, problems
    )
    return [*argv[1:], *(["--resume", strategy] if strategy else [])]


def run_strategies(assets: Path, out: Path, limit: int, problems: int) -> list[tuple[str, Path]]:
    """Vanilla and the three strategies at one context limit, each measured from scratch unless its sidecar says it
    was; ``(name, output)`` per run."""
    from freelm.manifest import errors_path, manifest_path

    out.mkdir(parents=True, exist_ok=True)
    inputs = []
    for name, strategy in STRATEGY_RUNS:
        path = out / f"{name}_ctx{limit}.jsonl"
        if not engine_path(path).is_file():
            print(f"\n== {name}, context limit {limit}, {problems} problems (measured)", flush=True)
            for stale in (path, manifest_path(path), errors_path(path)):  # a run cut short: measure it whole
                stale.unlink(missing_ok=True)
            measured, _, _ = measure(strategy_argv(assets, path, strategy, limit, problems))
            measured.save(engine_path(path))
        inputs.append((name, path))
    return inputs


def table(limits: list[tuple[int, list[tuple[str, Path]], Path]]) -> str:
    """One row per (context limit, run): pass@1 from ``freelm eval``'s metrics, the rest from the engine sidecars."""
    lines = [
        "| context limit | run | pass@1 (%) | peak context | peak KV decoded (tokens) | peak KV held (tokens / MiB) "
        "| prefill tokens (reasoning + cleaning) | reasoning re-prefilled | evicted | forwards | wall s | CPU s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for limit, inputs, metrics in limits:
        runs = {run["name"]: run["overall"] for run in json.loads(metrics.read_text())["runs"]}
        for name, path in inputs:
            m, o = Measured.load(engine_path(path)), runs[name]
            label = name if name == "vanilla" else f"Free()LM, {name}"
            lines.append(
                f"| {limit} | {label} | {100 * o['avg_at_n']:.1f} | {o['mean_peak_context_tokens']:.0f} "
                f"| {m.peak_live_kv} | {m.peak_held_kv} / {m.peak_held_kv * m.kv_entry_bytes / 2**20:.2f} "
                f"| {m.reasoning_prefill_tokens} + {m.cleaning_prefill_tokens} | {m.reprefilled_tokens} "
                f"| {m.evicted_tokens} | {m.forwards} | {m.wall_s:.1f} | {m.cpu_s:.1f} |"
            )
    return "\n".join(lines) + "\n"
