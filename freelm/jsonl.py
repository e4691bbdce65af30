"""JSONL files: the one reader every JSONL consumer uses, appending with fsync, whole-file rewrites, torn tails.

Why one module: runner outputs, error files, synthesis and judge results,
training logs, data and benchmark files are all JSON lines, and each must
survive a writer killed mid-line the same way. A kill can only tear the LAST
line: :func:`iter_jsonl` skips it (and names the file and line of any other
bad line), :func:`repair_torn_tail` makes the file appendable again, appends
are flushed and fsynced before they count (:func:`append_jsonl_lines`), and a
whole-file write goes through a temp file unique to its writer and a rename
(:func:`write_jsonl`, :func:`atomic_write` for any other file, :func:`unique_temp`),
so a reader sees the old file or the new one, never half. A line nested too deep for Python's decoder is a
bad line like any other (:func:`decode_line`); appends go through the file descriptor with no buffer
(:func:`append_bytes`), so a full disk fails once, and each object is encoded alone (:func:`encode_lines`), so
one that cannot be a line (a lone surrogate) need not take the others with it. What a line holds is the schema's business
(:mod:`freelm.records`, :mod:`freelm.data`, ...), not this module's.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def append_jsonl(handle, obj: dict[str, Any]) -> None:
    """Append one line and push it to disk: a kill can lose only what is in flight."""
    append_jsonl_lines(handle, [obj])


def append_jsonl_lines(handle, objs: Iterable[dict[str, Any]]) -> None:
    """Append lines and push them to disk with ONE fsync (about 5 ms on a busy disk: per line, a burst of
    finished rollouts queued behind it); a kill before it returns loses lines still in flight, and a torn
    last line is repaired on resume (:func:`repair_torn_tail`).

    All or nothing: an object that cannot be a line (:func:`encode_lines`) is a ValueError before anything
    is written. A writer that must keep the good lines of a batch with a bad one uses :func:`encode_lines`
    and :func:`append_bytes` itself (the runner does: a bad record fails alone).
    """
    data, failed = encode_lines(objs)
    if failed:
        index, reason = failed[0]
        raise ValueError(f"object {index} of the batch cannot be a JSON line ({reason}); nothing was written")
    append_bytes(handle, data)


def encode_lines(objs: Iterable[dict[str, Any]]) -> tuple[bytes, list[tuple[int, str]]]:
    """The objects as UTF-8 JSON lines, and ``(index, reason)`` of each left out because it cannot be one.

    A string with a lone surrogate (JSON's ``\\ud800`` escape decodes to one, so a server's reply can
    carry it) has no UTF-8 form; a value JSON has no form for, or nesting too deep, neither. Each object
    is encoded alone, so one that cannot be does not take the others with it.
    """
    parts, failed = [], []
    for index, obj in enumerate(objs):
        try:
            parts.append((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
        except (ValueError, TypeError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
            failed.append((index, f"{type(exc).__name__}: {exc}"))
    return b"".join(parts), failed


def append_bytes(handle: Any, data: bytes) -> None:
    """Write ``data`` to the end of ``handle``'s file and fsync it: ``os.write`` on its descriptor, no buffer.

    Without a buffer, a write that fails (disk full, quota, file-size limit) fails once, here: a buffered
    handle kept the unwritten rest and raised again when it was closed, a raw ``OSError`` after the clean
    message. What was written before the failure stays (at worst a torn last line, repaired on resume).
    ``handle`` is a descriptor opened with ``O_APPEND`` or a file opened for appending (``"ab"``; a text
    handle works too, written only through this module).
    """
    fd = handle if isinstance(handle, int) else handle.fileno()
    view = memoryview(data)
    while view:  # a write may take only part (a signal, a filling disk): the rest follows, or the error does
        view = view[os.write(fd, view) :]
    os.fsync(fd)


@contextmanager
def unique_temp(path: Path, *, binary: bool = False) -> Iterator[tuple[IO[Any], Path]]:
    """A temp file beside ``path`` that no other writer shares (random + pid suffix), fsynced when the block ends.

    Two writers of one file must never rename each other's half-written temp
    file. On error the temp file is removed and the error re-raised.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=f".{os.getpid()}.tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f:`` ``path`` is replaced whole when the block ends, or not at all.

    Through :func:`unique_temp` and a rename: a kill, a full disk or an error in
    the block leaves the previous file as it was (a plain ``write_text`` first
    truncates it). A symlink is followed: the file it names is replaced and the
    link stays.
    """
    target = Path(os.path.realpath(path))
    with unique_temp(target, binary=binary) as (f, tmp):
        yield f
    os.replace(tmp, target)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write a whole file atomically (:func:`atomic_write`): a reader sees the old file or the new one, never half."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | Path, *, tolerate_torn_tail: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)``; a torn LAST line (a writer killed mid-line) is dropped.

    Any other unparseable line is an error naming the file and line.
    """
    path = Path(path)
    with path.open("rb") as f:
        data = f.read()
    return iter_jsonl_bytes(data, path, tolerate_torn_tail=tolerate_torn_tail)


def iter_jsonl_bytes(
    data: bytes, path: str | Path, *, first_line: int = 1, tolerate_torn_tail: bool = True
) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`iter_jsonl` over bytes already read from ``path`` (named in errors), whose first line is line
    ``first_line`` of the file: a reader following a growing file parses only what was appended."""
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n")
    for number, raw in enumerate(lines, start=first_line):
        if not raw.strip():
            continue
        try:
            obj = decode_line(raw)
        except ValueError as exc:
            if tolerate_torn_tail and torn_tail and number == first_line + len(lines) - 1:
                return
            raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def decode_line(raw: bytes) -> Any:
    """One line's JSON value; any line that is not one this process can hold is a ValueError.

    Python's decoder recurses once per nesting level: a line nested about 1,000 deep (100,000 brackets of
    careless or hostile input) raised RecursionError, past every ``except ValueError`` of the readers.
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deep to read (arrays or objects about 1,000 levels deep)") from None


def repair_torn_tail(path: str | Path) -> int:
    """Make a killed writer's file appendable again; returns the bytes removed.

    A last line without its newline is truncated when it is not valid JSON, and
    completed with the newline when it is: :func:`iter_jsonl` yields such a line,
    so a reader that saw it (e.g. a resume deciding what is done) must keep it.
    Only the tail is read (a writer that repairs before each append stays O(line), not O(file)).
    """
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        cut = size - 1
        while cut > 0:  # back to the byte after the last newline
            start = max(0, cut - 65536)
            f.seek(start)
            newline = f.read(cut - start).rfind(b"\n")
            if newline >= 0:
                cut = start + newline + 1
                break
            cut = start
        f.seek(cut)
        tail = f.read()
        try:
            decode_line(tail)
        except ValueError:
            f.truncate(cut)
            return len(tail)
        f.write(b"\n")
        return 0
