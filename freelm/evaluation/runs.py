"""Naming runs on the command line (``NAME=PATH`` or ``PATH``) and loading them once.

A run's PATH may stand for its shards (:func:`freelm.shards.run_files`): the
un-sharded output name, a glob, or a comma-separated list; they are checked to
be exactly one run's shards and read as one run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from freelm.evaluation.external import read_any_rollouts
from freelm.evaluation.metrics import dedupe_records
from freelm.records import RolloutRecord
from freelm.shards import read_run, run_files, run_stem, shard_of_file


@dataclass
class Run:
    name: str
    path: Path
    records: list[RolloutRecord] = field(default_factory=list)
    duplicates: int = 0


def parse_run_spec(spec: str) -> Run:
    """``NAME=PATH`` names a run explicitly; a bare ``PATH`` is named by its file stem."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = run_stem(spec), spec
    if not name or not path:
        raise ValueError(f"bad run spec {spec!r}: expected NAME=PATH or PATH")
    return Run(name, Path(path))


def load_run(run: Run, *, source: str | None = None, answers: dict[tuple[str, str], str | None] | None = None) -> Run:
    """Runner records (one output or one run's shards), or other tools' rows in one file.

    ``source`` and ``answers`` fill what other tools' rows lack.
    """
    files = run_files(run.path)
    if len(files) == 1 and files[0].is_file() and shard_of_file(files[0]) is None:
        records = read_any_rollouts(files[0], source=source, answers=answers)
    else:
        records = read_run(files)
    if not records:
        raise ValueError(f"{run.path}: no rollout records")
    run.records, run.duplicates = dedupe_records(records)
    return run


def load_runs(
    specs: list[str],
    baseline: str | None = None,
    *,
    source: str | None = None,
    answers: dict[tuple[str, str], str | None] | None = None,
) -> tuple[list[Run], Run | None]:
    """Runs from ``--input`` specs; ``baseline`` is an input's name or a spec of its own."""
    runs = [parse_run_spec(s) for s in specs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}: name them with NAME=PATH")
    base = None
    if baseline is not None:
        base = next((r for r in runs if r.name == baseline), None)
        if base is None:
            base = parse_run_spec(baseline)
            if base.name in names:
                raise ValueError(f"baseline name {base.name!r} clashes with an input run")
            runs.insert(0, base)
    for run in runs:
        load_run(run, source=source, answers=answers)
    return runs, base
