"""Rule-based grading: a cheap normalized string match, then math-verify in worker processes.

math-verify times itself out with ``signal.alarm``, which only works in a
process's main thread, and some sympy calls hang in C code where no signal
reaches them. So every math-verify call runs in a worker process with a hard
deadline: a worker that overruns is killed and replaced, and its pair is graded
incorrect with reason ``timeout``; a crash is ``error``. Grading never stalls
and never raises on model output.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection, wait

GradeMethod = str  # "string" | "integer" | "math_verify" | "unanswered" | "too_long" | "timeout" | "error"

#: Longest final answer graded. Longer ones are graded incorrect (method ``too_long``) without being normalized
#: or sent to math-verify: no benchmark answer is this long, and sympy's time grows fast with size.
MAX_ANSWER_CHARS = 10_000

#: Methods that mean "a bound stopped grading" (counted as ``over_bounds`` in the report).
BOUNDED_METHODS = ("too_long", "timeout")


@dataclass(frozen=True)
class Grade:
    correct: bool
    method: GradeMethod
    decided: bool  # False when the rule grader could not judge (unparsed side, timeout, error)
    reason: str | None = None


UNANSWERED = Grade(False, "unanswered", True, "no answer extracted")

# --------------------------------------------------------------------------- string normalization

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|\\left|\\right|\s+")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def normalize_answer(text: str) -> str:
    """A canonical string for cheap equality and majority voting; never changes meaning on its own.

    Drops math delimiters, spacing macros, ``\\text{}``-style wrappers, degree
    signs, a trailing period, ``\\dfrac``/``\\tfrac`` spelling and integer
    leading zeros ("016" -> "16"). Text longer than :data:`MAX_ANSWER_CHARS` is
    returned as it is (bounded work on untrusted answers).
    """
    if len(text) > MAX_ANSWER_CHARS:
        return text
    s = text.strip().rstrip(".").strip().strip("$").strip()
    for _ in range(3):  # nested wrappers: \text{\textbf{A}}
        s = _TEXT_WRAPPER.sub(r"\1", s)
    s = _DEGREES.sub("", s)
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.rstrip(".")
    if _INTEGER.fullmatch(s):  # textually, not str(int(s)): Python refuses ints beyond 4300 digits
        digits = s.lstrip("+-").lstrip("0") or "0"
        s = ("-" if s.startswith("-") and digits != "0" else "") + digits
    return s


def quick_grade(gold: str, answer: str) -> Grade | None:
    """Settle the easy cases without sympy: equal normalized strings, or two different integers."""
    g, a = normalize_answer(gold), normalize_answer(answer)
    if g == a:
        return Grade(True, "string", True)
    if _INTEGER.fullmatch(g) and _INTEGER.fullmatch(a):
        return Grade(False, "integer", True)
    return None


# --------------------------------------------------------------------------- math-verify worker


def _as_math(text: str) -> str:
    """math-verify extracts from LaTeX environments: give it one (gold strings may carry stray ``$``)."""
    return "$" + text.strip().strip("$").strip() + "$"


@lru_cache(maxsize=4096)
def _parse(text: str, parse_timeout: int) -> list:
    """Cached per worker: one gold answer meets every distinct answer of its problem's rollouts."""
    from math_verify import parse

    return parse(_as_math(text), parsing_timeout=parse_timeout)


def math_verify_grade(gold: str, answer: str, parse_timeout: int = 5, verify_timeout: int = 5) -> Grade:
    """Grade one pair with math-verify, gold first (``verify`` is not symmetric). Call in a main thread."""
    from math_verify import verify

    gold_parsed = _parse(gold, parse_timeout)
    if not gold_parsed:
        return Grade(False, "math_verify", False, "ground truth not parseable")
    answer_parsed = _parse(answer, parse_timeout)
    if not answer_parsed:
        return Grade(False, "math_verify", False, "answer not parseable")
    ok = verify(gold_parsed, answer_parsed, timeout_seconds=verify_timeout)
    return Grade(bool(ok), "math_verify", True, None if ok else "not equivalent")


#: Consecutive worker deaths (no verdict in between) after which grading stops with an error.
MAX_DEATHS_IN_A_ROW = 5

GradeFn = Callable[[str, str, int, int], Grade]


def _worker_main(conn: Connection, grade_fn: GradeFn, parse_timeout: int, verify_timeout: int) -> None:
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        gold, answer = job
        try:
            grade = grade_fn(gold, answer, parse_timeout, verify_timeout)
        except Exception as exc:  # model output is untrusted: any failure is a graded "error"
            grade = Grade(False, "error", False, f"{type(exc).__name__}: {exc}"[:300])
        conn.send(grade)


def _context() -> multiprocessing.context.BaseContext:
    """forkserver: workers fork from a server that already imported sympy (cheap restarts after a kill),
    and are safe to start from a process that runs threads."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["math_verify"])
        return ctx
    return multiprocessing.get_context("spawn")


class _Worker:
    def __init__(self, ctx, grade_fn: GradeFn, parse_timeout: int, verify_timeout: int):
        self.conn, child = ctx.Pipe()
        args = (child, grade_fn, parse_timeout, verify_timeout)
        self.process = ctx.Process(target=_worker_main, args=args, daemon=True)
        self.process.start()
        child.close()
        self.job: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class GraderPool:
    """Worker processes grading (gold, answer) pairs with a hard per-pair deadline.

    Use as a context manager; workers start on first use and are reused across calls.
    ``grade_fn`` (a module-level function, pickled by reference) replaces
    math-verify, e.g. with a stricter checker.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 30.0,
        parse_timeout: int = 5,
        verify_timeout: int = 5,
        grade_fn: GradeFn = math_verify_grade,
    ):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.n_workers = workers
        self.timeout_s = timeout_s
        self.parse_timeout = parse_timeout
        self.verify_timeout = verify_timeout
        self.grade_fn = grade_fn
        self._workers: list[_Worker] = []
        self._ctx = None
        self.restarts = 0
        self._deaths_in_a_row = 0

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            w.process.join(2)
            if w.process.is_alive():
                w.kill()
        self._workers = []

    def _spawn(self) -> _Worker:
        if self._ctx is None:
            self._ctx = _context()
        return _Worker(self._ctx, self.grade_fn, self.parse_timeout, self.verify_timeout)

    def _replace(self, worker: _Worker, died: bool = False) -> None:
        """Swap in a fresh worker; workers that keep dying with no verdict in between mean a broken
        environment (e.g. a script without an ``if __name__ == "__main__"`` guard), not a bad answer."""
        self._deaths_in_a_row = self._deaths_in_a_row + 1 if died else 0
        if self._deaths_in_a_row >= MAX_DEATHS_IN_A_ROW:
            self.close()
            raise RuntimeError(
                f"{MAX_DEATHS_IN_A_ROW} grading workers in a row died without a verdict; "
                "if this runs from a script, guard its entry point with `if __name__ == '__main__':`"
            )
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        self.restarts += 1

    def map(self, pairs: list[tuple[str, str]], progress=None) -> list[Grade]:
        """Grade every pair (no quick path, no dedup: see :func:`grade_pairs`); order is kept."""
        results: list[Grade | None] = [None] * len(pairs)
        if not pairs:
            return []
        while len(self._workers) < min(self.n_workers, len(pairs)):
            self._workers.append(self._spawn())
        pending = iter(range(len(pairs)))
        remaining = len(pairs)

        def dispatch(worker: _Worker) -> None:
            index = next(pending, None)
            if index is None:
                return
            worker.job = index
            worker.deadline = time.monotonic() + self.timeout_s
            worker.conn.send(pairs[index])

        def finish(worker: _Worker, grade: Grade) -> None:
            nonlocal remaining
            results[worker.job] = grade
            worker.job = None
            remaining -= 1
            if progress is not None:
                progress.update(1)

        for worker in self._workers:
            dispatch(worker)
        while remaining:
            busy = [w for w in self._workers if w.job is not None]
            next_deadline = min(w.deadline for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for worker in busy:
                if worker.conn in ready:
                    try:
                        grade = worker.conn.recv()
                    except (EOFError, OSError):
                        finish(worker, Grade(False, "error", False, "grading worker died"))
                        self._replace(worker, died=True)
                        continue
                    self._deaths_in_a_row = 0
                    finish(worker, grade)
                elif time.monotonic() >= worker.deadline:
                    finish(worker, Grade(False, "timeout", False, f"no verdict within {self.timeout_s:g}s"))
                    self._replace(worker)
            for worker in self._workers:
                if worker.job is None:
                    dispatch(worker)
        return results  # type: ignore[return-value]


def grade_pairs(
    pairs: Iterable[tuple[str, str | None]], pool: GraderPool, progress=None
) -> dict[tuple[str, str | None], Grade]:
    """Grade distinct (gold, answer) pairs: unanswered, too long and quick cases locally, the rest in the pool.

    Rollouts of one problem often repeat an answer, so pairs are deduplicated first.
    """
    out: dict[tuple[str, str | None], Grade] = {}
    hard: list[tuple[str, str]] = []
    for gold, answer in dict.fromkeys(pairs):
        if answer is None:
            out[(gold, answer)] = UNANSWERED
            continue
        if len(answer) > MAX_ANSWER_CHARS:
            out[(gold, answer)] = Grade(False, "too_long", True, f"answer of {len(answer)} chars > {MAX_ANSWER_CHARS}")
            continue
        quick = quick_grade(gold, answer)
        if quick is not None:
            out[(gold, answer)] = quick
        else:
            hard.append((gold, answer))
    if progress is not None:
        progress.total = len(hard)
        progress.refresh()
    for pair, grade in zip(hard, pool.map(hard, progress)):
        out[pair] = grade
    return out
