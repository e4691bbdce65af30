"""Evaluation problems: one validated loader for JSONL files and Hugging Face datasets.

:func:`load_problem_sources` joins several of them (files, globs, Hub names) into
one run: a paper reproduction runs every benchmark in one invocation, so the
servers never idle through one benchmark's tail before the next starts.

Benchmarks store the bare problem statement; the instruction the model sees is
appended at prompt-rendering time (:data:`freelm.prompts.PROBLEM_SUFFIX`), so
the data files stay identical to their upstream sources.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freelm.jsonl import iter_jsonl
from freelm.validation import FieldError, check_text, expect

REQUIRED_FIELDS = ("id", "prompt")


@dataclass
class Problem:
    """One evaluation problem; ``extra`` keeps every other source field (category, url, ...)."""

    id: str
    source: str
    prompt: str
    answer: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """Ids repeat across benchmarks (AIME25 and BeyondAIME both have id 1): key by source too."""
        return (self.source, self.id)


#: Types of the fields the loader reads (JSON numbers are fine as ids and answers; every other field is kept as is).
ROW_TYPES: dict[str, Any] = {"id": str | int, "prompt": str, "answer": str | int | float | None, "source": str | None}


def _problem_from_row(row: dict[str, Any], where: str, default_source: str) -> Problem:
    missing = [name for name in REQUIRED_FIELDS if row.get(name) in (None, "")]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    try:
        for name, annotation in ROW_TYPES.items():
            expect(row.get(name), annotation, name)
            check_text(row.get(name), name)  # a lone surrogate: a prompt no tokenizer takes, an answer no file holds
    except FieldError as exc:
        raise ValueError(f"{where}: {exc}") from None
    answer = row.get("answer")
    extra = {k: v for k, v in row.items() if k not in ("id", "source", "prompt", "answer")}
    return Problem(
        id=str(row["id"]),
        source=str(row.get("source") or default_source),
        prompt=row["prompt"],
        answer=None if answer is None else str(answer),
        extra=extra,
    )


def _check_unique(problems: list[Problem], wheres: list[str]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for problem, where in zip(problems, wheres):
        if problem.key in seen:
            raise ValueError(
                f"{where}: duplicate id {problem.id!r} (source {problem.source!r}), first at {seen[problem.key]}"
            )
        seen[problem.key] = where


def _load_jsonl(path: Path) -> list[Problem]:
    try:
        rows = list(iter_jsonl(path, tolerate_torn_tail=False))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read problem file ({exc})") from exc
    problems, wheres = [], []
    for number, row in rows:
        where = f"{path}:{number}"
        problems.append(_problem_from_row(row, where, default_source=path.stem))
        wheres.append(where)
    if not problems:
        raise ValueError(f"{path}: no problems in file")
    _check_unique(problems, wheres)
    return problems


def _load_hf(name: str, split: str | None) -> list[Problem]:
    """Load a Hub dataset (``name`` or ``name:config``); needs the ``hub`` extra and network access."""
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"{name}: not a local file, and loading from the Hub needs `pip install datasets`") from exc
    repo, _, config = name.partition(":")
    ds = datasets.load_dataset(repo, config or None, split=split or "test")
    problems, wheres = [], []
    for index, row in enumerate(ds):
        where = f"{name}[{split or 'test'}][{index}]"
        problems.append(_problem_from_row(dict(row), where, default_source=repo.rsplit("/", 1)[-1]))
        wheres.append(where)
    _check_unique(problems, wheres)
    return problems


def load_problems(path_or_hf_name: str | Path, split: str | None = None, limit: int | None = None) -> list[Problem]:
    """Problems from a local JSONL file, or else from a Hugging Face dataset name.

    A path that looks local (exists, or ends in ``.jsonl``/``.json``) never falls
    through to the Hub, so a typo in a file name is an error, not a download.
    """
    path = Path(path_or_hf_name)
    if path.exists() or path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise ValueError(f"{path}: problem file not found")
        problems = _load_jsonl(path)
    else:
        problems = _load_hf(str(path_or_hf_name), split)
    return problems[:limit] if limit is not None else problems


_GLOB_CHARS = frozenset("*?[")


def expand_data_specs(specs: list[str | Path]) -> list[str]:
    """Each ``--data`` value as files or Hub names: a glob becomes its sorted matches (none is an error).

    The same file named twice (a glob and an explicit path that overlap) counts once.
    """
    expanded: list[str] = []
    for spec in map(str, specs):
        if _GLOB_CHARS & set(spec) and not Path(spec).exists():
            matches = sorted(glob.glob(spec))
            if not matches:
                raise ValueError(f"--data {spec}: no file matches this pattern")
            expanded.extend(matches)
        else:
            expanded.append(spec)
    seen: set[str] = set()
    unique = []
    for spec in expanded:
        key = str(Path(spec).resolve()) if Path(spec).exists() else spec
        if key not in seen:
            seen.add(key)
            unique.append(spec)
    return unique


def load_problem_sources(specs: list[str | Path], split: str | None = None, limit: int | None = None) -> list[Problem]:
    """Problems of every source in ``specs`` (files, globs, Hub names), in order; ``limit`` applies per source.

    A ``(source, id)`` in two sources (two files with the same stem, say) is an
    error naming both, because the runner keys rollouts by it.
    """
    problems: list[Problem] = []
    first: dict[tuple[str, str], str] = {}
    for spec in expand_data_specs(specs):
        for problem in load_problems(spec, split=split, limit=limit):
            if problem.key in first:
                raise ValueError(
                    f"{spec}: problem {problem.id!r} of source {problem.source!r} is also in {first[problem.key]}: "
                    "give each benchmark its own source"
                )
            first[problem.key] = spec
            problems.append(problem)
    return problems
