"""Guarding a runner output: one writer at a time, room to write before the first request, clean failure after.

Why each rule:

* Two runners on one ``OUT`` each skip what the file held when they started and
  append the rest, so every rollout is written twice (and the manifest's temp
  file was shared). :class:`OutputLock` takes an exclusive ``fcntl.flock`` on
  ``OUT.lock`` for the whole run; the second runner exits 2 naming the holder
  (pid, host, start time, command), which the holder writes into the lock file.
  The lock is the file's, not the name's: ``OUT.lock`` sits beside the path
  ``OUT`` resolves to, so a symlink to another live run's output is refused
  naming that run's path (two names once let two runners write 48 lines for
  24 keys into one file).
  The kernel drops the lock when the holder dies, even on SIGKILL, so there is
  never a stale lock to delete by hand. (``flock`` is per host on NFS before
  Linux 2.6.12 and on some network filesystems: run one host per output there.)
* An output that cannot be written must fail before anything is sent, not
  after an hour of generation: :func:`check_output_writable` checks the
  directory, the existing files and the free space.
* A write that fails mid-run (disk full, quota, a vanished mount) raises
  :class:`OutputWriteError`, whose message says that everything written so far
  is intact and what to do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from freelm.manifest import errors_path, lock_path, manifest_path, now_iso
from freelm.redact import redact_obj

#: Free space required before the first request: a few thousand long rollouts, and room for the manifest.
MIN_FREE_BYTES = 256 * 2**20


class OutputLocked(ValueError):
    """Another live process holds ``OUT.lock``; nothing was sent or written."""


class OutputUnwritable(ValueError):
    """``OUT``'s directory or files cannot be written, or the disk is (nearly) full; checked before any request."""


class OutputWriteError(RuntimeError):
    """A write failed mid-run; the run stopped with every line written before it intact."""

    def __init__(self, output: Path, cause: OSError):
        super().__init__(
            f"{write_failure(output, cause)}; the run stopped. Every rollout written "
            "before the failure is intact (a torn last line is repaired at the next start). Free space or fix the "
            "output's filesystem, then re-run the same command: it resumes where this run stopped."
        )


def write_failure(path: Path, cause: OSError) -> str:
    """What went wrong writing ``path``, in a few words: ``the disk is full while writing X (No space left...)``."""
    what = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is full",
        errno.EFBIG: "the file reached the size limit of this process (ulimit -f)",
    }.get(cause.errno, "a write failed")
    return f"{what} while writing {path} ({cause.strerror or cause})"


def check_output_writable(output: Path, min_free_bytes: int | None = None) -> None:
    """Raise :class:`OutputUnwritable` unless ``output`` and its companion files can be written. Creates nothing."""
    output = Path(output)
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir():
        raise OutputUnwritable(f"--output {output}: directory {directory} does not exist (create it first)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputUnwritable(f"--output {output}: directory {directory} is not writable")
    for path in (output, errors_path(output), manifest_path(output), lock_path(os.path.realpath(output))):
        if path.exists() and (not path.is_file() or not os.access(path, os.W_OK)):
            raise OutputUnwritable(f"--output {output}: {path} exists and is not a writable file")
    need = MIN_FREE_BYTES if min_free_bytes is None else min_free_bytes
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OutputUnwritable(
            f"--output {output}: only {free / 2**20:.0f} MiB free on {directory} (at least {need / 2**20:.0f} MiB "
            "needed): free space or choose another --output"
        )


class OutputLock:
    """``with OutputLock(output):`` an exclusive, process-lifetime lock on the output file itself.

    The lock file is ``OUT.lock`` beside the file ``OUT`` resolves to (symlinks
    followed, of the file and of every directory on the way), so two names of
    one file are one lock: a runner writing through a symlink to another live
    run's output is refused, naming the path the other runner writes. (A hard
    link is a second name the path cannot reveal: do not hard-link outputs.)
    """

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = lock_path(os.path.realpath(output))
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # the directory check passed, but the filesystem may still refuse (read-only mount)
            raise OutputUnwritable(f"--output {self.output}: cannot create {self.path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, theirs = _read_holder(fd)
            os.close(fd)
            what = str(self.output)
            if theirs is not None and os.path.abspath(theirs) != os.path.abspath(self.output):
                what = f"{self.output} is the same file as {theirs}, which"
            raise OutputLocked(
                f"{what} is being written by another runner ({holder}); wait for it to finish, "
                "or write to another --output"
            ) from None
        info = {
            "pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso(), "command": sys.argv,
            "output": os.path.abspath(self.output),
        }  # fmt: skip
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(redact_obj(info)) + "\n").encode())
        except OSError as exc:  # a full disk: refused like any unwritable output, before anything is sent
            os.close(fd)
            raise OutputUnwritable(f"--output {self.output}: cannot write {self.path} ({exc.strerror})") from None
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock and close; the file stays (deleting it would race with a runner that just opened it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int, wait_s: float = 2.0) -> tuple[str, str | None]:
    """Who holds the lock, and the output path it was given; a holder that has just locked may not have written
    its line yet, so wait a little."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except (OSError, ValueError, RecursionError):  # empty, half-written, or not what a runner writes
            info = {}
        if (isinstance(info, dict) and "pid" in info) or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if not isinstance(info, dict) or "pid" not in info:
        return "pid unknown: it is just starting", None
    command = " ".join(map(str, info.get("command") or []))
    output = info.get("output") if isinstance(info.get("output"), str) else None
    return f"pid {info['pid']} on {info.get('host')}, started {info.get('started_at')}: {command[:200]}", output
