"""Running a batch of rollouts and writing each as it finishes.

One rollout per ``(problem, rollout index)``, ``--concurrency`` of them in flight
on one asyncio loop, each a :func:`freelm.loop.run_rollout` over an
:class:`~freelm.backends.pool.EndpointPool` (least-loaded healthy endpoint, a
failed request retried elsewhere without losing the rollout's state).

Why the output is safe to kill at any moment: each finished rollout is one JSONL
line, written, flushed and fsynced with the rest of its batch before it counts as
done (``jsonl.append_jsonl_lines``), so a
SIGKILL loses at most the rollouts in flight and can only tear the last line,
which the next start truncates (``jsonl.repair_torn_tail``). Failed rollouts
(``finish_reason == "error"``: a server that stayed down, a 4xx) are not written
to the output but to ``OUT.errors.jsonl``, so re-running the same command retries
exactly them and the rest is skipped.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freelm.backends.base import ContextWindow
from freelm.backends.pool import EndpointPool
from freelm.data import Problem
from freelm.jsonl import append_bytes, encode_lines, repair_torn_tail
from freelm.loop import run_rollout
from freelm.manifest import errors_path, manifest_path, now_iso, package_versions
from freelm.output_guard import OutputWriteError
from freelm.records import RolloutRecord, RolloutResult
from freelm.run.cleaning import CleaningTally
from freelm.run.components import Components
from freelm.run.manifest import RunManifest
from freelm.run.plan import ExistingOutput, Job, history, inspect_output, move_aside, plan_jobs
from freelm.run.settings import RunSettings
from freelm.run.spec import RunSpec


@dataclass
class RunSummary:
    """Counts of one invocation; printed at the end and stored in the manifest."""

    total: int = 0  # rollouts wanted: problems x n_rollouts (of this shard)
    present_at_start: int = 0
    done: int = 0
    failed: int = 0
    generated_tokens: int = 0
    cleaning_rounds: int = 0
    retries: int = 0
    wall_time_s: float = 0.0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    cleaning: CleaningTally = field(default_factory=CleaningTally)  # this invocation's rollouts
    #: the rollouts the output held at the start (same settings): with ``cleaning``, what the cleaning rule judges
    cleaning_at_start: CleaningTally = field(default_factory=CleaningTally, repr=False)

    @property
    def output_cleaning(self) -> CleaningTally:
        """Every rollout the output holds: the rule judges the run, not only this invocation."""
        return self.cleaning_at_start.merged(self.cleaning)

    @property
    def remaining(self) -> int:
        return self.total - self.present_at_start - self.done

    @property
    def mean_cleaning_rounds(self) -> float:
        return self.cleaning_rounds / self.done if self.done else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        del fields["cleaning_at_start"]
        return {
            **fields,
            "cleaning": self.cleaning.to_dict(),
            "remaining": self.remaining,
            "mean_cleaning_rounds": round(self.mean_cleaning_rounds, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
        }

    def format(self) -> str:
        return (
            f"rollouts: {self.done} done, {self.failed} failed, {self.present_at_start} already present, "
            f"{self.remaining} remaining of {self.total}\n"
            f"tokens generated: {self.generated_tokens} ({self.tokens_per_s:.1f}/s); "
            f"mean cleaning rounds: {self.mean_cleaning_rounds:.2f}; retries: {self.retries}; "
            f"wall time: {self.wall_time_s:.1f}s; finish: {self.finish_reasons}"
        ) + (f"\n{self.cleaning.format()}" if self.cleaning.rounds else "")


async def run_batch(
    problems: list[Problem],
    spec: RunSpec,
    components: Components,
    *,
    existing: ExistingOutput | None = None,
    window: ContextWindow | None = None,
    served: dict[str, Any] | None = None,
    run_id: str | None = None,
) -> RunSummary:
    """Resume-aware batch: skip what ``spec.output`` holds, run the rest of the shard's jobs, keep the manifest current.

    ``window`` is the reasoner servers' window (see
    :func:`~freelm.run.components.served_limits`); ``served`` what the servers
    said about themselves, recorded in the manifest. ``existing`` is what
    :func:`~freelm.run.plan.inspect_output` found (read again when not given).
    ``run_id`` names this invocation when :func:`~freelm.run.plan.record_start`
    already wrote its start to the manifest.
    """
    output, settings = spec.output, spec.settings
    if existing is None:
        existing = inspect_output(output, settings, force=spec.force)
    previous: list[dict[str, Any]] = []
    if existing.mismatch:
        print(f"--force: moved the old output aside to {move_aside(output)}", file=sys.stderr)
    else:
        for path in (output, errors_path(output)):  # a kill tears the errors file's last line too
            try:
                repair_torn_tail(path)
            except OSError as exc:
                raise OutputWriteError(path, exc) from exc
        previous = history(output, settings, run_id)

    jobs, owned = plan_jobs(problems, spec.n_rollouts, settings.seed, existing.keys, spec.shard)
    summary = RunSummary(total=owned, present_at_start=owned - len(jobs), cleaning_at_start=existing.cleaning)
    manifest = RunManifest(
        output=str(output), command=sys.argv, config=spec.flags, settings=settings.to_dict(),
        config_hash=settings.config_hash, mode=settings.mode, versions=package_versions(), problems=len(problems),
        n_rollouts=spec.n_rollouts, shard=spec.shard.to_dict(), started_at=now_iso(),
        run_id=run_id or uuid.uuid4().hex, previous_runs=previous, served=served or {},
        seeds_honoured=(served or {}).get("seeds_honoured"),
    )  # fmt: skip

    def save(status: str) -> None:
        manifest.status, manifest.summary = status, summary.to_dict()
        manifest.endpoints = [p.stats() for p in components.pools]
        if settings.cleaner is not None:
            manifest.cleaning = spec.cleaning_rule.report(summary.output_cleaning)
        if status != "running":
            manifest.ended_at = now_iso()
        try:
            manifest.write()
        except OSError as exc:  # a full disk refuses the manifest too: the same clear message, never a traceback
            raise OutputWriteError(manifest_path(output), exc) from exc

    save("running")
    started = time.perf_counter()
    try:
        with _few_collections():
            await _execute(jobs, spec, components, summary=summary, started=started, window=window)
    except BaseException:
        summary.wall_time_s = time.perf_counter() - started
        try:
            save("interrupted")
        except OutputWriteError:  # the disk that refused the output may refuse the manifest too: the output counts
            pass
        raise
    summary.wall_time_s = time.perf_counter() - started
    save("complete" if summary.failed == 0 else "incomplete")
    return summary


@dataclass
class _Finished:
    """A rollout handed from a worker to the writer: a result to record, or the error that ended it."""

    job: Job
    result: RolloutResult | None
    error: str | None


async def _execute(
    jobs: list[Job],
    spec: RunSpec,
    components: Components,
    *,
    summary: RunSummary,
    started: float,
    window: ContextWindow | None,
) -> None:
    """Workers run rollouts; ONE writer task appends them, so workers never wait for the disk.

    A finished rollout waiting in the queue counts as in flight: a kill loses
    it like any other in-flight rollout, and the next run redoes it.
    """
    from tqdm import tqdm

    if not jobs:
        return
    pending = iter(jobs)  # shared by the workers; next() never awaits, so no lock is needed
    queue: asyncio.Queue[_Finished | None] = asyncio.Queue()
    bar = tqdm(
        total=summary.total, initial=summary.present_at_start, unit="rollout", dynamic_ncols=True,
        disable=None if spec.progress is None else not spec.progress,
    )  # fmt: skip
    writer = asyncio.create_task(
        _write_finished(queue, spec.output, spec.settings, summary, bar, components.pools, started)
    )

    async def worker() -> None:
        for job in pending:
            if writer.done():  # the writer died (disk full, ...): stop producing, its error is raised below
                return
            try:
                result = await run_rollout(
                    job.problem.prompt, reasoner=components.reasoner, tokenizer=components.tokenizer,
                    cleaner=components.cleaner, config=spec.loop, seed=job.seed, window=window,
                )  # fmt: skip
                error = result.error if result.finish_reason == "error" else None
            except Exception as exc:  # a bug or unexpected input must cost one rollout, not the run
                result, error = None, f"{type(exc).__name__}: {exc}"
            queue.put_nowait(_Finished(job, result, error))

    workers = [asyncio.create_task(worker()) for _ in range(min(spec.concurrency, len(jobs)))]
    try:
        running = {writer, *workers}
        while writer in running and len(running) > 1:  # the writer ends first only when it failed
            _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # interrupted, or the writer failed: the rollouts in flight cannot be saved. Every worker is cancelled AND
        # awaited (an abandoned one printed "exception was never retrieved" at Ctrl-C); what they finished is written
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        queue.put_nowait(None)
        try:
            await writer
        finally:
            bar.close()


@contextmanager
def _few_collections() -> Iterator[None]:
    """Garbage collection sized for hundreds of rollouts in flight, for the run's duration.

    The collector stops the event loop, so every rollout, at once: measured at
    256 in flight it took ~3.5% of the run, in pauses up to ~100 ms, mostly
    rescanning the heap built before the run (modules, the tokenizer) and
    collecting every 700 allocations of an asyncio + aiohttp loop. That heap is
    frozen (never garbage) and the youngest generation collected every 20,000
    allocations instead: ~1% of the run.
    """
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(20_000, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


async def _write_finished(
    queue: asyncio.Queue[_Finished | None],
    output: Path,
    settings: RunSettings,
    summary: RunSummary,
    bar: Any,
    pools: tuple[EndpointPool, ...],
    started: float,
) -> None:
    """Drain the queue in batches; each batch is written and fsynced once (``append_bytes``) in a thread,
    off the event loop: one fsync per line (about 5 ms here) queued a burst of finished rollouts behind the disk.

    The output is open unbuffered: a write that fails (a full disk) fails once, in the batch that hit it,
    and nothing is left in a buffer to fail again when the file closes (a raw OSError traceback after the
    clean message, one run in six)."""
    try:
        out = output.open("ab", buffering=0)
    except OSError as exc:
        raise OutputWriteError(output, exc) from exc
    with out:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            finished = [item for item in batch if item is not None]
            await asyncio.to_thread(_append_finished, out, output, finished, settings)
            for item in finished:
                if item.error is None:
                    summary.done += 1
                    summary.generated_tokens += item.result.generated_tokens
                    summary.cleaning_rounds += item.result.cleaning_rounds
                    summary.cleaning.add(item.job.key, item.result.rounds)
                    reason = item.result.finish_reason
                    summary.finish_reasons[reason] = summary.finish_reasons.get(reason, 0) + 1
                else:
                    summary.failed += 1
            summary.retries = sum(p.retries for p in pools)
            bar.update(len(finished))
            bar.set_postfix(_postfix(summary, pools, started), refresh=False)
            if len(finished) < len(batch):  # the end marker: every worker is done
                return


def _append_finished(out, output: Path, finished: list[_Finished], settings: RunSettings) -> None:
    """One batch: its records, then its errors, each file with one fsync for the batch.

    A record that cannot be written (a lone surrogate in a server's text has no UTF-8 form) fails alone:
    its rollout goes to the errors file with the reason, and the batch's other records are written.
    """
    config_hash = settings.config_hash  # a property that hashes the settings: once per batch, not per record
    done = [item for item in finished if item.error is None]
    data, unwritable = encode_lines(
        RolloutRecord.from_result(
            item.result, id=item.job.problem.id, source=item.job.problem.source, rollout=item.job.rollout,
            seed=item.job.seed, answer=item.job.problem.answer, mode=settings.mode, config_hash=config_hash,
            prompt=item.job.problem.prompt,
        ).to_dict()
        for item in done
    )  # fmt: skip
    for index, reason in unwritable:
        done[index].error = f"its record cannot be written: {reason}"
    if data:
        _append(output, out, data)
    errors = [_error_entry(item, config_hash) for item in finished if item.error is not None]
    if errors:
        path = errors_path(output)
        try:
            handle = path.open("ab", buffering=0)
        except OSError as exc:
            raise OutputWriteError(path, exc) from exc
        with handle:
            _append(path, handle, encode_lines(errors)[0])


def _append(path: Path, handle, data: bytes) -> None:
    try:
        append_bytes(handle, data)
    except OSError as exc:
        raise OutputWriteError(path, exc) from exc


def _error_entry(item: _Finished, config_hash: str) -> dict[str, Any]:
    """The errors file's line; its text is escaped where it is not Unicode (a server's message can carry a
    lone surrogate), so the entry of a rollout that failed is always written."""
    job, result = item.job, item.result
    return {
        "time": now_iso(),
        "source": job.problem.source,
        "id": job.problem.id,
        "rollout": job.rollout,
        "seed": job.seed,
        "config_hash": config_hash,
        "error": item.error.encode("utf-8", "backslashreplace").decode("utf-8"),
        "generated_tokens": result.generated_tokens if result is not None else 0,
        "rounds": len(result.rounds) if result is not None else 0,
    }


def _postfix(summary: RunSummary, pools: tuple[EndpointPool, ...], started: float) -> dict[str, Any]:
    elapsed = max(time.perf_counter() - started, 1e-9)
    postfix: dict[str, Any] = {
        "tok/s": f"{summary.generated_tokens / elapsed:.0f}",
        "clean": summary.cleaning_rounds,
        "failed": summary.failed,
        "retries": summary.retries,
    }
    if pools:
        postfix["up"] = "+".join(f"{p.endpoints_up}/{len(p.endpoints)}" for p in pools)
    return postfix
