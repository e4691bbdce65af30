"""Rule-based grading: a cheap normalized string match, then math-verify in worker processes.

A verdict must not depend on how busy the machine is. math-verify's own
timeouts (``parse(parsing_timeout=)``, ``verify(timeout_seconds=)``) are
``signal.alarm`` wall-clock alarms, and when one fires ``parse`` returns ``[]``
and ``verify`` returns ``False`` with only a logged warning (math_verify 0.9.0:
``parser.py: parse`` and ``grader.py: verify`` catch their ``TimeoutException``):
an answer that needs 0.2 s of CPU is graded "not parseable" or "not
equivalent" once the machine is loaded enough to stretch that past 5 s. So
math-verify's timeouts are off here, and each pair is bounded by the **CPU
time** its worker process spends on it, which load does not stretch:

* ``setitimer(ITIMER_PROF)`` raises :class:`CpuBudgetExceeded` in the worker when
  the pair has used its budget (a ``BaseException``: math-verify and sympy catch
  ``Exception``; it re-fires every 50 ms of CPU in case a bare ``except:``
  swallows one);
* ``RLIMIT_CPU`` 2 s past the budget has the kernel kill a worker stuck in C
  code, where no Python signal handler runs (SIGXCPU);
* the parent kills a worker whose CPU clock has not moved for ``stall_s``
  seconds of wall time (a stopped or wedged process; a busy machine still gives
  every process some CPU).

A pair over its budget is graded again with ``RETRY_GROWTH`` times the budget,
``retries`` times, then reported with method ``timeout``: incorrect but
undecided (never "wrong": ``fallback`` sends it to the judge, and the report
counts it). A worker crash is ``error``. Grading never stalls and never raises
on model output.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache, lru_cache
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


@cache
def _quiet_math_verify() -> None:
    """math-verify warns once per process that its timeouts are off; the CPU budget below replaces them."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)


@lru_cache(maxsize=4096)
def _parse(text: str) -> list:
    """Cached per worker: one gold answer meets every distinct answer of its problem's rollouts.

    A parse cut short by the CPU budget raises, so it is never cached.
    """
    from math_verify import parse

    return parse(_as_math(text), parsing_timeout=None)


def math_verify_grade(gold: str, answer: str) -> Grade:
    """Grade one pair with math-verify, gold first (``verify`` is not symmetric).

    math-verify's wall-clock timeouts are off (see the module docstring): call it
    under a CPU budget (:class:`GraderPool`), not on its own with untrusted answers.
    """
    from math_verify import verify

    _quiet_math_verify()
    gold_parsed = _parse(gold)
    if not gold_parsed:
        return Grade(False, "math_verify", False, "ground truth not parseable")
    answer_parsed = _parse(answer)
    if not answer_parsed:
        return Grade(False, "math_verify", False, "answer not parseable")
    ok = verify(gold_parsed, answer_parsed, timeout_seconds=None)
    return Grade(bool(ok), "math_verify", True, None if ok else "not equivalent")


#: Consecutive worker deaths (no verdict in between) after which grading stops with an error.
MAX_DEATHS_IN_A_ROW = 5
#: Each retry of a pair that ran out of CPU gets this many times the previous budget.
RETRY_GROWTH = 4.0
#: The kernel's CPU limit (RLIMIT_CPU, whole seconds) sits this far past a pair's budget.
_KERNEL_LIMIT_MARGIN_S = 2
#: After the budget, SIGPROF re-fires this often (CPU seconds) until the pair is over.
_REFIRE_S = 0.05

GradeFn = Callable[[str, str], Grade]


class CpuBudgetExceeded(BaseException):
    """A pair used its CPU budget. A ``BaseException`` so graders' ``except Exception`` cannot turn it into a verdict."""


_armed = False
#: The worker's own RLIMIT_CPU, restored after each pair.
_cpu_limit = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def _on_sigprof(signum, frame) -> None:
    if _armed:  # a late tick after the pair finished is ignored
        raise CpuBudgetExceeded


def _arm(budget_s: float) -> None:
    global _armed
    soft, hard = _cpu_limit
    used = resource.getrusage(resource.RUSAGE_SELF)
    limit = math.ceil(used.ru_utime + used.ru_stime + budget_s) + _KERNEL_LIMIT_MARGIN_S
    if soft == resource.RLIM_INFINITY or limit < soft:
        resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))
    _armed = True
    signal.setitimer(signal.ITIMER_PROF, budget_s, _REFIRE_S)


def _disarm() -> None:
    global _armed
    _armed = False
    signal.setitimer(signal.ITIMER_PROF, 0)
    resource.setrlimit(resource.RLIMIT_CPU, _cpu_limit)


def _grade_within(grade_fn: GradeFn, gold: str, answer: str, budget_s: float) -> Grade:
    """``grade_fn(gold, answer)`` under a CPU budget: a timeout or an exception becomes a grade, never a raise."""
    try:
        try:
            _arm(budget_s)
            return grade_fn(gold, answer)
        finally:
            _disarm()
    except CpuBudgetExceeded:
        _disarm()  # the signal may have landed inside the first disarm
        return Grade(False, "timeout", False, f"over its CPU budget of {budget_s:g} s")
    except Exception as exc:  # model output is untrusted: any failure is a graded "error"
        return Grade(False, "error", False, f"{type(exc).__name__}: {exc}"[:300])


def _worker_main(conn: Connection, grade_fn: GradeFn) -> None:
    global _cpu_limit
    _cpu_limit = resource.getrlimit(resource.RLIMIT_CPU)
    signal.signal(signal.SIGPROF, _on_sigprof)
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))  # SIGXCPU dumps core
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        gold, answer, budget_s = job
        conn.send(_grade_within(grade_fn, gold, answer, budget_s))


def _context() -> multiprocessing.context.BaseContext:
    """forkserver: workers fork from a server that already imported sympy (cheap restarts after a kill),
    and are safe to start from a process that runs threads."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["math_verify"])
        return ctx
    return multiprocessing.get_context("spawn")


def _cpu_ticks(pid: int) -> int | None:
    """A process's CPU time so far (user + system, clock ticks) from ``/proc``; None where there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)


class _Worker:
    def __init__(self, ctx, grade_fn: GradeFn):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, grade_fn), daemon=True)
        self.process.start()
        child.close()
        self.job: int | None = None
        self.budget_s = 0.0
        self._ticks: int | None = None
        self._progress_at = 0.0

    def start(self, job: int, budget_s: float) -> None:
        self.job, self.budget_s = job, budget_s
        self._ticks, self._progress_at = _cpu_ticks(self.process.pid), time.monotonic()

    def stalled(self, stall_s: float) -> bool:
        """No CPU used for ``stall_s`` of wall time (without ``/proc``: no verdict within ``stall_s`` of wall time)."""
        ticks = _cpu_ticks(self.process.pid)
        now = time.monotonic()
        if ticks is not None and ticks != self._ticks:
            self._ticks, self._progress_at = ticks, now
        return now - self._progress_at >= stall_s

    def over_cpu_limit(self) -> bool:
        """Killed by the kernel's CPU limit (the budget guard for C code that no signal handler interrupts)."""
        self.process.join(5)
        return self.process.exitcode == -signal.SIGXCPU

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)
        self.conn.close()


class GraderPool:
    """Worker processes grading (gold, answer) pairs, each within a CPU-time budget (see the module docstring).

    ``timeout_s`` is the CPU seconds a pair may use on its first attempt; a pair
    over it is graded again with :data:`RETRY_GROWTH` times the budget, up to
    ``retries`` times, then reported as ``timeout``. Use as a context manager;
    workers start on first use and are reused across calls. ``grade_fn`` (a
    module-level function, pickled by reference) replaces math-verify, e.g.
    with a stricter checker.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        retries: int = 1,
        grade_fn: GradeFn = math_verify_grade,
        stall_s: float = 60.0,
    ):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("the grading budget must be > 0 seconds and retries >= 0")
        self.n_workers = workers
        self.timeout_s = timeout_s
        self.retries = retries
        self.grade_fn = grade_fn
        self.stall_s = stall_s
        self._workers: list[_Worker] = []
        self._ctx = None
        self.restarts = 0
        self.retried = 0  # attempts repeated with a larger budget
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
        return _Worker(self._ctx, self.grade_fn)

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

    def budget(self, attempt: int) -> float:
        """CPU seconds for attempt ``attempt`` (0-based) of a pair."""
        return self.timeout_s * RETRY_GROWTH**attempt

    def map(self, pairs: list[tuple[str, str]], progress=None) -> list[Grade]:
        """Grade every pair (no quick path, no dedup: see :func:`grade_pairs`); order is kept."""
        results: list[Grade | None] = [None] * len(pairs)
        if not pairs:
            return []
        while len(self._workers) < min(self.n_workers, len(pairs)):
            self._workers.append(self._spawn())
        pending: deque[int] = deque(range(len(pairs)))
        attempts = [0] * len(pairs)
        remaining = len(pairs)

        def dispatch(worker: _Worker) -> None:
            if not pending:
                return
            index = pending.popleft()
            budget = self.budget(attempts[index])
            worker.start(index, budget)
            worker.conn.send((*pairs[index], budget))

        def finish(worker: _Worker, grade: Grade) -> None:
            """Record a verdict; a timeout with retries left goes back in the queue with a larger budget."""
            nonlocal remaining
            index, worker.job = worker.job, None
            if grade.method == "timeout":
                attempts[index] += 1
                if attempts[index] <= self.retries:
                    self.retried += 1
                    pending.append(index)
                    return
                budgets = ", ".join(f"{self.budget(a):g}" for a in range(attempts[index]))
                grade = Grade(False, "timeout", False, f"{grade.reason}; CPU budgets tried (s): {budgets}")
            results[index] = grade
            remaining -= 1
            if progress is not None:
                progress.update(1)

        for worker in self._workers:
            dispatch(worker)
        while remaining:
            busy = [w for w in self._workers if w.job is not None]
            ready = wait([w.conn for w in busy], timeout=min(1.0, self.stall_s))
            for worker in busy:
                if worker.conn in ready:
                    try:
                        grade = worker.conn.recv()
                    except (EOFError, OSError):
                        if worker.over_cpu_limit():
                            finish(
                                worker, Grade(False, "timeout", False, f"over its CPU budget of {worker.budget_s:g} s")
                            )
                            self._replace(worker)
                        else:
                            finish(worker, Grade(False, "error", False, "grading worker died"))
                            self._replace(worker, died=True)
                        continue
                    self._deaths_in_a_row = 0
                    finish(worker, grade)
                elif worker.stalled(self.stall_s):
                    finish(worker, Grade(False, "timeout", False, f"no CPU progress for {self.stall_s:g} s"))
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
