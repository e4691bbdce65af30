"""What a run still has to do: what its output already holds, and the jobs left.

Why resuming refuses a different config: every line carries the hash of the
settings that decide results (:mod:`freelm.run.settings`); mixing two
experiments in one file would silently corrupt pass@k. ``--force`` moves the
old files aside instead. The manifest's ``previous_runs`` keeps every earlier
invocation on the same output, including one killed while loading a model
(:func:`record_start`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freelm.data import Problem
from freelm.jsonl import iter_jsonl
from freelm.manifest import errors_path, manifest_path, now_iso, read_manifest
from freelm.records import read_rollouts
from freelm.run.cleaning import CleaningTally
from freelm.run.manifest import RunStart
from freelm.run.settings import RunSettings, rollout_seed, settings_differences
from freelm.shards import Shard

RolloutKey = tuple[str, str, int]  # (source, id, rollout): ids repeat across benchmarks


class ConfigMismatch(ValueError):
    """The output was written with other settings; raised before anything is sent or written."""


@dataclass(frozen=True)
class Job:
    """One rollout to run: its problem, index and seed."""

    problem: Problem
    rollout: int
    seed: int

    @property
    def key(self) -> RolloutKey:
        return (self.problem.source, self.problem.id, self.rollout)


@dataclass
class ExistingOutput:
    """What an output file already holds, checked against this run's settings."""

    keys: set[RolloutKey] = field(default_factory=set)
    mismatch: str | None = None  # why the file cannot be resumed with these settings (then --force replaces it)
    cleaning: CleaningTally = field(default_factory=CleaningTally)  # the cleaning outcomes of the rollouts it holds


def inspect_output(output: Path, settings: RunSettings, *, force: bool) -> ExistingOutput:
    """Read ``output`` and its error file (if any) without changing them; raise ConfigMismatch unless ``force``.

    The error file counts too: a run whose every rollout failed leaves no record, and its failures
    must not be mixed with another configuration's. A torn last line is ignored here and truncated
    by :func:`~freelm.run.batch.run_batch` when the run starts; any other bad line is an error naming
    file and line.
    """
    existing = ExistingOutput()
    errors = errors_path(output)
    records = read_rollouts(output) if output.exists() else []
    failed = {obj.get("config_hash") for _, obj in iter_jsonl(errors)} if errors.exists() else set()
    ours = settings.config_hash
    theirs = sorted(({r.config_hash for r in records} | {h for h in failed if isinstance(h, str)}) - {ours})
    existing.keys = {r.key for r in records if r.config_hash == ours}
    for record in records:
        if record.config_hash == ours:
            existing.cleaning.add(record.key, record.rounds)
    if theirs:
        existing.mismatch = _mismatch_message(output, theirs, settings)
        if not force:
            raise ConfigMismatch(existing.mismatch + "\nre-run with --force to move the old files aside and start over")
        existing.keys, existing.cleaning = set(), CleaningTally()
    return existing


def _mismatch_message(output: Path, theirs: list[str], settings: RunSettings) -> str:
    message = f"{output} was written with config hash {', '.join(theirs)}; this run's is {settings.config_hash}"
    old = read_manifest(output)
    if old and old.get("config_hash") in theirs and isinstance(old.get("settings"), dict):
        diffs = settings_differences(old["settings"], settings.to_dict())
        message += "\ndiffering settings (old -> new):\n  " + "\n  ".join(diffs)
    else:
        message += f"\n(no matching manifest {manifest_path(output)}: cannot list the differing settings)"
    return message


def move_aside(output: Path) -> Path:
    """Rename the output, its manifest and its error file to ``OUT.replaced-TIME``; returns the new output path.

    A name an earlier ``--force`` took in the same second gets ``-2``, ``-3``, ...: a rename would overwrite it.
    """
    stamp = f"{output}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = Path(stamp), 1
    while any(p.exists() for p in (target, manifest_path(target), errors_path(target))):
        n += 1
        target = Path(f"{stamp}-{n}")
    for path, moved in zip(
        (output, manifest_path(output), errors_path(output)), (target, manifest_path(target), errors_path(target))
    ):
        if path.exists():
            path.rename(moved)
    return target


def plan_jobs(
    problems: list[Problem], n_rollouts: int, seed: int, skip: set[RolloutKey], shard: Shard = Shard()
) -> tuple[list[Job], int]:
    """The jobs to run and how many ``shard`` owns in all (run or not).

    Problem-major order: rollouts of one problem run together and share the server's prompt cache.
    """
    jobs, owned = [], 0
    for problem in problems:
        for index in range(n_rollouts):
            if not shard.owns(problem.source, problem.id, index):
                continue
            owned += 1
            job = Job(problem, index, rollout_seed(seed, problem.source, problem.id, index))
            if job.key not in skip:
                jobs.append(job)
    return jobs, owned


def _run_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    return {key: manifest.get(key) for key in ("started_at", "ended_at", "status", "summary", "command")}


def history(output: Path, settings: RunSettings, run_id: str | None) -> list[dict[str, Any]]:
    """Earlier invocations on ``output``: the old manifest's, plus the old manifest itself unless it is this run's start."""
    old = read_manifest(output)
    if not old or old.get("config_hash") != settings.config_hash:
        return []
    earlier = list(old.get("previous_runs", []))
    return earlier if run_id is not None and old.get("run_id") == run_id else [*earlier, _run_entry(old)]


def record_start(output: Path, settings: RunSettings, run_id: str) -> None:
    """Write the manifest with status ``starting`` before anything slow (loading a model, health checks).

    A run killed before its first full manifest then still appears under
    ``previous_runs`` of the next one, so ``previous_runs`` counts every start.
    """
    RunStart(
        output=str(output), command=sys.argv, settings=settings.to_dict(), config_hash=settings.config_hash,
        mode=settings.mode, started_at=now_iso(), run_id=run_id, previous_runs=history(output, settings, None),
    ).write()  # fmt: skip
