"""Concurrent, multi-endpoint, resumable batch inference: ``runner.py`` / ``freelm run``.

The order of a start is the point of this module: every check that needs no
server (flags, endpoints, settings, data, writability) runs before the output
lock, what the output holds is read only under it, and only then are models
loaded and servers asked (:mod:`freelm.run.components`), so bad input exits 2
with nothing sent or written. The flags become a :class:`~freelm.run.spec.RunSpec`
once, here; nothing below sees the ``Namespace``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from freelm.data import Problem, load_problem_sources
from freelm.manifest import errors_path, manifest_path
from freelm.output_guard import OutputLock, OutputUnwritable, OutputWriteError, check_output_writable
from freelm.run.batch import RunSummary, run_batch
from freelm.run.cleaning import EXIT_CLEANING, describe_cleaner, flag_message
from freelm.run.components import Components, build_components, check_health, learn_limits, startup_checks
from freelm.run.flags import add_arguments, build_parser, validate_args
from freelm.run.isolation import check_isolation
from freelm.run.plan import ExistingOutput, inspect_output, record_start
from freelm.run.spec import RunSpec

__all__ = ["add_arguments", "main", "run"]


#: Exit code of a run stopped by Ctrl-C (SIGINT), and by SIGTERM (128 + the signal, as a shell reports a process
#: killed by it: a scheduler's stop, Slurm's time limit or a pod's eviction, is told apart from a person's Ctrl-C).
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class Terminated(BaseException):
    """SIGTERM: ends the run the way Ctrl-C does (rollouts in flight cancelled, finished ones written, the
    manifest ``interrupted``). A BaseException like KeyboardInterrupt, so no ``except Exception`` swallows it."""


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 all rollouts present, 1 some failed or a write failed (re-run resumes), 2 bad input or config
    (including another runner on the same output), 3 the run is flagged by the cleaning-outcome rule
    (:mod:`freelm.run.cleaning`; every rollout kept, re-running would not help), 130 interrupted (Ctrl-C),
    143 terminated (SIGTERM)."""
    with _sigterm_raises():
        try:
            return _run(args)
        except KeyboardInterrupt:
            print("interrupted: finished rollouts are saved; re-run the same command to resume", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated:
            print(
                "terminated (SIGTERM): finished rollouts are saved; re-run the same command to resume", file=sys.stderr
            )
            return EXIT_TERMINATED


def _run(args: argparse.Namespace) -> int:
    try:
        validate_args(args)
        spec = RunSpec.from_args(args)
        spec.settings  # noqa: B018 -- computed now: a bad template is an error before anything is read or locked
        problems = load_problem_sources(list(spec.data), split=spec.split, limit=spec.limit)
        check_output_writable(spec.output)
        lock = OutputLock(spec.output).acquire()
    except ValueError as exc:  # includes OutputLocked / OutputUnwritable: nothing was sent or written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run_locked(spec, problems)
    finally:
        lock.release()


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while the run is outside its event loop (loading data or a model);
    inside it, :func:`_stop_on_sigterm` cancels the run's main task instead (a signal must not raise in the
    middle of a callback). Only the main thread can handle signals: elsewhere (a library caller's thread)
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_locked(spec: RunSpec, problems: list[Problem]) -> int:
    """Everything after the output lock: read what the output holds only now, so no other runner can change it."""
    run_id = uuid.uuid4().hex
    try:
        existing = inspect_output(spec.output, spec.settings, force=spec.force)
        if not existing.mismatch:
            try:
                record_start(spec.output, spec.settings, run_id)  # counted in previous_runs if killed while loading
            except OSError as exc:
                raise OutputUnwritable(str(OutputWriteError(manifest_path(spec.output), exc))) from None
        components = build_components(spec)
    except ValueError as exc:  # includes ConfigMismatch, OutputUnwritable: nothing was sent
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_stop_on_sigterm(_run_async(spec, components, problems, existing, run_id)))
    except OutputWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _stop_on_sigterm(run: Coroutine[Any, Any, int]) -> int:
    """Run ``run`` as the loop's main task, which SIGTERM cancels as Ctrl-C does (asyncio's own SIGINT
    handling); it then ends in :class:`Terminated`."""
    if threading.current_thread() is not threading.main_thread():
        return await run
    loop, task, stopped = asyncio.get_running_loop(), asyncio.current_task(), []
    loop.add_signal_handler(signal.SIGTERM, lambda: (stopped.append(True), task.cancel()))
    try:
        return await run
    except asyncio.CancelledError:
        if stopped:
            raise Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _raise_terminated)


async def _run_async(
    spec: RunSpec, components: Components, problems: list[Problem], existing: ExistingOutput, run_id: str
) -> int:
    try:
        try:
            await check_health(components)
            endpoints = await startup_checks(spec, components)
            window, served = await learn_limits(spec, components)
            isolation = await check_isolation(spec, components, problems)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        summary = await run_batch(
            problems, spec, components, existing=existing, window=window,
            served={**served, "endpoints": endpoints, "isolation": isolation}, run_id=run_id,
        )  # fmt: skip
    finally:
        await components.aclose()
    print(summary.format())
    flagged = _judge_cleaning(spec, summary)
    if summary.failed:
        print(
            f"{summary.failed} rollout(s) failed (see {errors_path(spec.output)}); re-run the same command to retry them"
        )
    return EXIT_CLEANING if flagged else 1 if summary.failed else 0


def _judge_cleaning(spec: RunSpec, summary: RunSummary) -> bool:
    """Apply the cleaning-outcome rule to everything the output holds; print its message; True when flagged."""
    settings = spec.settings
    tally = summary.output_cleaning
    verdict = spec.cleaning_rule.verdict(tally)
    if settings.cleaner is None or verdict not in ("flagged", "accepted"):
        return False
    template = spec.cleaner_options.get("clean_template")
    cleaner = describe_cleaner(spec.cleaner, settings.cleaner, template)
    message = flag_message(tally, spec.cleaning_rule, output=spec.output, cleaner=cleaner)
    print(f"{'error' if verdict == 'flagged' else 'warning'}: {message}", file=sys.stderr)
    return verdict == "flagged"


def main(argv: list[str] | None = None) -> int:
    return run(build_parser("runner.py", __doc__.split("\n\n")[0]).parse_args(argv))
