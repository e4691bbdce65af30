"""Where the evaluation commands write: never over one of their inputs, and each file whole or not at all.

``eval_passk.py --output run.jsonl`` used to overwrite the rollouts it had just
graded, and exit 0; metrics written to a full disk left 4,096 bytes of invalid
JSON where the previous ``metrics.json`` had been. So, before anything is
computed, :func:`refuse_aliases` stops a command whose output is the same file
as one of its inputs or as another of its outputs (compared by device and
inode: through symlinks, hard links and the shard files a run name stands for),
and every output is written through :func:`output_file`: a temp file beside it,
fsynced, renamed over it (:func:`freelm.jsonl.atomic_write`), so a failed
write leaves the previous file as it was and ends in one line saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from freelm.jsonl import atomic_write
from freelm.manifest import manifest_path
from freelm.output_guard import write_failure


class OutputWriteFailed(RuntimeError):
    """An output could not be written (disk full, permissions); the file is as it was before."""


def run_input_files(specs: Iterable[str | None]) -> list[Path]:
    """Every file the ``[NAME=]PATH`` run specs read: each run's files (shards included) and their manifests."""
    from freelm.evaluation.runs import parse_run_spec
    from freelm.shards import run_files

    files: list[Path] = []
    for spec in specs:
        if spec is None:
            continue
        for path in run_files(parse_run_spec(spec).path):
            files += [path, *(m for m in [manifest_path(path)] if m.exists())]
    return files


def _identity(path: Path) -> tuple[int, int] | str:
    try:
        st = os.stat(path)
    except OSError:  # not there yet: the path it would be created at
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def refuse_aliases(outputs: Mapping[str, Path | None], inputs: Mapping[str, Iterable[Path]]) -> None:
    """``ValueError`` naming both paths when an output is the same file as an input or as an earlier output.

    ``outputs`` and ``inputs`` map a flag (``--output``, ``--input``...) to its
    path(s); ``None`` is an output not asked for.
    """
    seen: dict[tuple[int, int] | str, tuple[str, Path]] = {}
    for flag, paths in inputs.items():
        for path in paths:
            seen.setdefault(_identity(path), (flag, path))
    for flag, path in outputs.items():
        if path is None:
            continue
        key = _identity(path)
        if key in seen:
            other_flag, other = seen[key]
            raise ValueError(
                f"{flag} {path} is the same file as {other_flag} {other}: refusing to overwrite it "
                f"(nothing was computed or written); choose another {flag}"
            )
        seen[key] = (flag, path)


@contextmanager
def output_file(path: Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """``with output_file(path) as f:`` ``path`` written whole (its directory created), or :class:`OutputWriteFailed`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, binary=binary) as f:
            yield f
    except OSError as exc:
        raise OutputWriteFailed(f"{write_failure(path, exc)}: {path} was left as it was") from None


def write_output(path: Path, text: str) -> None:
    """Write one text output whole (:func:`output_file`)."""
    with output_file(path) as f:
        f.write(text)
