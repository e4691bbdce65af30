"""judge.jsonl: one :class:`Judgment` per line, read back, and shared by every judge process that names it.

The file is the judge's cache: the latest line per (source, id, ground truth,
extracted answer) counts, and ``error`` lines are asked again by the next run.
It is shared, so no answer is judged (and paid for) twice.

Two judges on one cache used to each judge every answer: each read the file
once at start. Now a judge claims an answer before asking about it, and reads
what the others appended since it last looked before it sends anything:

* a claim is a POSIX record lock (``fcntl.lockf``) on one byte of
  ``<cache>.lock``, at an offset given by the answer's hash (62 bits), so judges
  work side by side and only ever wait on an answer another one is asking about;
  the lock file sits beside the cache's resolved path, so a symlink to the cache
  shares its claims;
* with the claim held, the judge reads the lines appended since its last look
  (only those: :func:`~freelm.jsonl.iter_jsonl_bytes` from the last offset),
  and an answer another judge finished meanwhile is not asked again;
* a verdict is appended while its claim is held, with an unbuffered write to an
  ``O_APPEND`` descriptor and an fsync, under an exclusive lock on byte 0 that
  every appender takes for its write, so a tail without its newline can only be
  a write that failed or a writer killed mid-line: the next appender cuts it off
  first (:func:`~freelm.jsonl.repair_torn_tail`), and readers take complete
  lines only. (Unbuffered, because a buffered handle keeps the unwritten rest of
  a failed write, e.g. on a full disk, and writes it again with the next line.);
* lines are ASCII JSON (``\\uXXXX`` escapes): an extracted answer holding a lone
  surrogate (a ``\\ud800`` escape in a run file) is stored, and matched when read
  back, exactly as it was, where UTF-8 cannot hold it;
* the kernel drops a process's locks when it dies, SIGKILL included: the answer
  a killed judge was asking about is claimed by the next one, and there is never
  a stale lock to delete.

POSIX record locks belong to a process, not to a file handle: one process runs
one judge per cache at a time (a second :class:`JudgmentCache` of the same file
in the same process would share its claims), and the lock file is opened once.
On network filesystems without POSIX locks, run one judge per cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from freelm.evaluation.metrics import JudgeKey
from freelm.jsonl import append_bytes, iter_jsonl, iter_jsonl_bytes, repair_torn_tail

Verdict = Literal["correct", "incorrect", "unparseable", "error"]
FINAL_VERDICTS = ("correct", "incorrect", "unparseable")


@dataclass
class Judgment:
    """One line of judge.jsonl."""

    source: str
    id: str
    ground_truth: str
    answer: str
    verdict: Verdict
    model: str
    attempts: int
    raw: str | None = None
    error: str | None = None

    @property
    def key(self) -> JudgeKey:
        return (self.source, self.id, self.ground_truth, self.answer)


def judgments_from_rows(rows: Iterable[tuple[int, dict[str, Any]]], path: str | Path) -> Iterator[Judgment]:
    """Judgments from ``(line_number, object)`` rows read from ``path`` (named in errors)."""
    names = {f.name for f in fields(Judgment)}
    for number, obj in rows:
        try:
            judgment = Judgment(**{k: v for k, v in obj.items() if k in names})
        except TypeError as exc:
            raise ValueError(f"{path}:{number}: not a judgment ({exc})") from exc
        if judgment.verdict not in (*FINAL_VERDICTS, "error"):
            raise ValueError(f"{path}:{number}: unknown verdict {judgment.verdict!r}")
        yield judgment


def read_judgments(path: str | Path) -> dict[JudgeKey, Judgment]:
    """The latest judgment per key; a torn last line (killed judge) is ignored."""
    return {j.key: j for j in judgments_from_rows(iter_jsonl(path), path)}


def verdicts_for_grading(judgments: dict[JudgeKey, Judgment]) -> dict[JudgeKey, bool]:
    """Final verdicts as booleans (``unparseable`` = incorrect); ``error`` entries count as not judged."""
    return {k: j.verdict == "correct" for k, j in judgments.items() if j.verdict in FINAL_VERDICTS}


_WRITE_LOCK = 0  # byte 0: held exclusively while appending; claims are at 1 + a 62-bit hash


def lock_path(cache: str | Path) -> Path:
    """The claims file of ``cache``: beside its resolved path, so every name of one file shares one."""
    real = Path(os.path.realpath(cache))
    return real.with_name(real.name + ".lock")


def _claim_offset(key: JudgeKey) -> int:
    digest = hashlib.sha256(json.dumps(key, ensure_ascii=False).encode("utf-8", "surrogatepass")).digest()
    return 1 + (int.from_bytes(digest[:8], "big") >> 2)


class JudgmentCache:
    """``with JudgmentCache(path) as cache:`` the verdicts in ``path`` (``done``), claims and appends.

    ``done`` holds the latest judgment per answer among the lines read so far;
    :meth:`final` reads what was appended since, first.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: dict[JudgeKey, Judgment] = {}
        self._offset = 0  # bytes of the cache read so far (always at a line start)
        self._lines = 0
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the cache, O_APPEND

    def __enter__(self) -> JudgmentCache:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock_fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        self.refresh()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops every claim this process still holds
            self._lock_fd = None

    def refresh(self) -> None:
        """Read the complete lines appended since the last look (by any judge)."""
        with self.path.open("rb") as f:
            if f.seek(0, os.SEEK_END) < self._offset:  # the file was replaced by a shorter one: start over
                self._offset, self._lines, self.done = 0, 0, {}
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a tail without its newline is being written, or was torn by a kill
        if not end:
            return
        rows = iter_jsonl_bytes(data[:end], self.path, first_line=self._lines + 1)
        for judgment in judgments_from_rows(rows, self.path):
            self.done[judgment.key] = judgment
        self._offset += end
        self._lines += data.count(b"\n", 0, end)

    def final(self, key: JudgeKey) -> bool:
        """Whether ``key`` has a final verdict (``error`` is not one), after reading what others appended."""
        self.refresh()
        judgment = self.done.get(key)
        return judgment is not None and judgment.verdict in FINAL_VERDICTS

    def claim(self, key: JudgeKey) -> bool:
        """Take ``key`` for this process; False while another judge process holds it. Never waits."""
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _claim_offset(key), os.SEEK_SET)
        except OSError:  # EAGAIN / EACCES: held elsewhere
            return False
        return True

    def release(self, key: JudgeKey) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, _claim_offset(key), os.SEEK_SET)

    def append(self, judgment: Judgment) -> None:
        """Append one verdict line (fsynced); a torn tail left by a killed judge is cut off first."""
        line = (json.dumps(asdict(judgment)) + "\n").encode("ascii")  # see the module docstring
        fcntl.lockf(self._lock_fd, fcntl.LOCK_EX, 1, _WRITE_LOCK, os.SEEK_SET)
        try:
            repair_torn_tail(self.path)
            append_bytes(self._fd, line)
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, _WRITE_LOCK, os.SEEK_SET)
        self.done[judgment.key] = judgment
