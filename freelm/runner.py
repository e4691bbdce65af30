"""Concurrent, multi-endpoint, resumable batch inference: ``runner.py`` / ``freelm run``.

One rollout per ``(problem, rollout index)``, ``--concurrency`` of them in flight
on one asyncio loop, each a :func:`freelm.loop.run_rollout` over an
:class:`~freelm.backends.pool.EndpointPool` (least-loaded healthy endpoint, a
failed request retried elsewhere without losing the rollout's state).

Why the output is safe to kill at any moment: each finished rollout is one JSONL
line written, flushed and fsynced on its own (``records.append_jsonl``), so a
SIGKILL loses at most the rollouts in flight and can only tear the last line,
which the next start truncates (``records.repair_torn_tail``). Failed rollouts
(``finish_reason == "error"``: a server that stayed down, a 4xx) are not written
to the output but to ``OUT.errors.jsonl``, so re-running the same command retries
exactly them and the rest is skipped.

Why resuming refuses a different config: every line carries the hash of the
settings that decide results (:mod:`freelm.runner_config`); mixing two
experiments in one file would silently corrupt pass@k. ``--force`` moves the
old files aside instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freelm.backends import get_backend_kind
from freelm.backends.base import Backend, BackendError, ContextWindow, ServerLimits
from freelm.backends.pool import EndpointPool
from freelm.cleaners.base import Cleaner
from freelm.cleaners.lora import LoRACleaner
from freelm.cleaners.registry import get_cleaner
from freelm.data import Problem, load_problem_sources
from freelm.loop import LoopConfig, run_rollout
from freelm.manifest import errors_path, manifest_path, now_iso, package_versions, read_manifest, write_manifest
from freelm.output_guard import OutputLock, OutputWriteError, check_output_writable
from freelm.records import RolloutRecord, RolloutResult, append_jsonl, read_rollouts, repair_torn_tail
from freelm.runner_config import (
    RunSettings,
    add_arguments,
    loop_config,
    normalize_endpoint,
    read_endpoints_file,
    rollout_seed,
    run_settings,
    settings_differences,
    validate_args,
)
from freelm.shards import Shard
from freelm.tokenizer import Tokenizer

__all__ = ["ConfigMismatch", "Job", "RunSummary", "add_arguments", "inspect_output", "run", "run_batch"]

RolloutKey = tuple[str, str, int]  # (source, id, rollout): ids repeat across benchmarks


class ConfigMismatch(ValueError):
    """The output was written with other settings; raised before anything is sent or written."""


@dataclass(frozen=True)
class Job:
    problem: Problem
    rollout: int
    seed: int

    @property
    def key(self) -> RolloutKey:
        return (self.problem.source, self.problem.id, self.rollout)


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
        return {
            **asdict(self),
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
        )


# --------------------------------------------------------------------------- resume


@dataclass
class ExistingOutput:
    """What an output file already holds, checked against this run's settings."""

    keys: set[RolloutKey] = field(default_factory=set)
    mismatch: str | None = None  # why the file cannot be resumed with these settings (then --force replaces it)


def inspect_output(output: Path, settings: RunSettings, *, force: bool) -> ExistingOutput:
    """Read ``output`` (if any) without changing it; raise ConfigMismatch unless ``force``.

    A torn last line is ignored here and truncated by :func:`run_batch` when the
    run starts; any other bad line is an error naming file and line.
    """
    existing = ExistingOutput()
    if not output.exists():
        return existing
    records = read_rollouts(output)
    ours = settings.config_hash
    theirs = sorted({r.config_hash for r in records} - {ours})
    existing.keys = {r.key for r in records if r.config_hash == ours}
    if theirs:
        existing.mismatch = _mismatch_message(output, theirs, settings)
        if not force:
            raise ConfigMismatch(existing.mismatch + "\nre-run with --force to move the old files aside and start over")
        existing.keys = set()
    return existing


def _mismatch_message(output: Path, theirs: list[str], settings: RunSettings) -> str:
    message = f"{output} was written with config hash {', '.join(theirs)}; this run's is {settings.config_hash}"
    old = read_manifest(output)
    if old and old.get("config_hash") in theirs and isinstance(old.get("settings"), dict):
        diffs = settings_differences(old["settings"], settings.to_dict())
        message += "\ndiffering settings (old -> new):\n  " + "\n  ".join(diffs)
    else:
        message += f"\n(no matching manifest {manifest_path(output)}: cannot list the differing settings)"
    return message


def _move_aside(output: Path) -> Path:
    target = Path(f"{output}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    for path, moved in zip(
        (output, manifest_path(output), errors_path(output)), (target, manifest_path(target), errors_path(target))
    ):
        if path.exists():
            path.rename(moved)
    return target


def plan_jobs(
    problems: list[Problem], n_rollouts: int, seed: int, skip: set[RolloutKey], shard: Shard = Shard()
) -> tuple[list[Job], int]:
    """The jobs to run and how many ``shard`` owns in all (run or not).

    Problem-major order: rollouts of one problem run together and share the server's prompt cache.
    """
    jobs, owned = [], 0
    for problem in problems:
        for index in range(n_rollouts):
            if not shard.owns(problem.source, problem.id, index):
                continue
            owned += 1
            job = Job(problem, index, rollout_seed(seed, problem.source, problem.id, index))
            if job.key not in skip:
                jobs.append(job)
    return jobs, owned


# --------------------------------------------------------------------------- execution


async def run_batch(
    problems: list[Problem],
    *,
    output: Path,
    settings: RunSettings,
    config: LoopConfig,
    reasoner: Backend,
    tokenizer: Tokenizer,
    cleaner: Cleaner | None,
    n_rollouts: int,
    concurrency: int,
    force: bool = False,
    existing: ExistingOutput | None = None,
    pools: tuple[EndpointPool, ...] = (),
    manifest_config: dict[str, Any] | None = None,
    progress: bool | None = None,
    window: ContextWindow | None = None,
    served: dict[str, Any] | None = None,
    shard: Shard = Shard(),
    run_id: str | None = None,
) -> RunSummary:
    """Resume-aware batch: skip what ``output`` holds, run the rest of ``shard``'s jobs, keep the manifest current.

    ``progress=None`` shows the bar only on a terminal. ``window`` is the
    reasoner servers' window (see :func:`served_limits`); ``served`` what the
    servers said about themselves, recorded in the manifest. ``output`` is the shard's own file.
    ``run_id`` names this invocation when :func:`record_start` already wrote its start to the manifest.
    """
    output = Path(output)
    if existing is None:
        existing = inspect_output(output, settings, force=force)
    history: list[dict[str, Any]] = []
    if existing.mismatch:
        print(f"--force: moved the old output aside to {_move_aside(output)}", file=sys.stderr)
    else:
        repair_torn_tail(output)
        history = _history(output, settings, run_id)

    jobs, owned = plan_jobs(problems, n_rollouts, settings.seed, existing.keys, shard)
    summary = RunSummary(total=owned, present_at_start=owned - len(jobs))
    manifest: dict[str, Any] = {
        "output": str(output),
        "command": sys.argv,
        "config": manifest_config or {},
        "settings": settings.to_dict(),
        "config_hash": settings.config_hash,
        "mode": settings.mode,
        "versions": package_versions(),
        "problems": len(problems),
        "n_rollouts": n_rollouts,
        "shard": shard.to_dict(),
        "started_at": now_iso(),
        "ended_at": None,
        "status": "running",
        "run_id": run_id or uuid.uuid4().hex,
        "previous_runs": history,
        "served": served or {},
        "seeds_honoured": (served or {}).get("seeds_honoured"),
    }

    def save(status: str) -> None:
        manifest.update(status=status, summary=summary.to_dict(), endpoints=[p.stats() for p in pools])
        if status != "running":
            manifest["ended_at"] = now_iso()
        write_manifest(output, manifest)

    save("running")
    started = time.perf_counter()
    try:
        await _execute(
            jobs, output=output, settings=settings, config=config, reasoner=reasoner, tokenizer=tokenizer,
            cleaner=cleaner, concurrency=concurrency, summary=summary, pools=pools, progress=progress,
            started=started, window=window,
        )  # fmt: skip
    except BaseException:
        summary.wall_time_s = time.perf_counter() - started
        try:
            save("interrupted")
        except OSError:  # the disk that refused the output may refuse the manifest too: the output is what counts
            pass
        raise
    summary.wall_time_s = time.perf_counter() - started
    save("complete" if summary.failed == 0 else "incomplete")
    return summary


def _run_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    return {key: manifest.get(key) for key in ("started_at", "ended_at", "status", "summary", "command")}


def _history(output: Path, settings: RunSettings, run_id: str | None) -> list[dict[str, Any]]:
    """Earlier invocations on ``output``: the old manifest's, plus the old manifest itself unless it is this run's start."""
    old = read_manifest(output)
    if not old or old.get("config_hash") != settings.config_hash:
        return []
    earlier = list(old.get("previous_runs", []))
    return earlier if run_id is not None and old.get("run_id") == run_id else [*earlier, _run_entry(old)]


def record_start(output: Path, settings: RunSettings, run_id: str) -> None:
    """Write the manifest with status ``starting`` before anything slow (loading a model, health checks).

    A run killed before its first full manifest then still appears under
    ``previous_runs`` of the next one, so ``previous_runs`` counts every start.
    """
    write_manifest(
        output,
        {
            "output": str(output), "command": sys.argv, "settings": settings.to_dict(),
            "config_hash": settings.config_hash, "mode": settings.mode, "started_at": now_iso(), "ended_at": None,
            "status": "starting", "run_id": run_id, "previous_runs": _history(output, settings, None),
        },
    )  # fmt: skip


@dataclass
class _Finished:
    """A rollout handed from a worker to the writer: a result to record, or the error that ended it."""

    job: Job
    result: RolloutResult | None
    error: str | None


async def _execute(
    jobs: list[Job],
    *,
    output: Path,
    settings: RunSettings,
    config: LoopConfig,
    reasoner: Backend,
    tokenizer: Tokenizer,
    cleaner: Cleaner | None,
    concurrency: int,
    summary: RunSummary,
    pools: tuple[EndpointPool, ...],
    progress: bool | None,
    started: float,
    window: ContextWindow | None = None,
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
        disable=None if progress is None else not progress,
    )  # fmt: skip
    writer = asyncio.create_task(_write_finished(queue, output, settings, summary, bar, pools, started))

    async def worker() -> None:
        for job in pending:
            if writer.done():  # the writer died (disk full, ...): stop producing, its error is raised below
                return
            try:
                result = await run_rollout(
                    job.problem.prompt, reasoner=reasoner, tokenizer=tokenizer, cleaner=cleaner,
                    config=config, seed=job.seed, window=window,
                )  # fmt: skip
                error = result.error if result.finish_reason == "error" else None
            except Exception as exc:  # a bug or unexpected input must cost one rollout, not the run
                result, error = None, f"{type(exc).__name__}: {exc}"
            queue.put_nowait(_Finished(job, result, error))

    workers = asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))
    try:
        # the writer ends before the workers only when it failed: stop the rollouts in flight, they cannot be saved
        await asyncio.wait({workers, writer}, return_when=asyncio.FIRST_COMPLETED)
        if writer.done() and not workers.done():
            workers.cancel()
        await workers
    finally:
        if not workers.done():
            workers.cancel()
        queue.put_nowait(None)
        try:
            await writer
        finally:
            bar.close()


async def _write_finished(
    queue: asyncio.Queue[_Finished | None],
    output: Path,
    settings: RunSettings,
    summary: RunSummary,
    bar: Any,
    pools: tuple[EndpointPool, ...],
    started: float,
) -> None:
    """Drain the queue in batches; each line is fsynced (``append_jsonl``) in a thread, off the event loop."""
    with output.open("a", encoding="utf-8") as out:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            finished = [item for item in batch if item is not None]
            try:
                await asyncio.to_thread(_append_finished, out, output, finished, settings)
            except OSError as exc:
                raise OutputWriteError(output, exc) from exc
            for item in finished:
                if item.error is None:
                    summary.done += 1
                    summary.generated_tokens += item.result.generated_tokens
                    summary.cleaning_rounds += item.result.cleaning_rounds
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
    errors = None
    try:
        for item in finished:
            job = item.job
            if item.error is None:
                record = RolloutRecord.from_result(
                    item.result, id=job.problem.id, source=job.problem.source, rollout=job.rollout, seed=job.seed,
                    answer=job.problem.answer, mode=settings.mode, config_hash=settings.config_hash,
                    prompt=job.problem.prompt,
                )  # fmt: skip
                append_jsonl(out, record.to_dict())
                continue
            errors = errors or errors_path(output).open("a", encoding="utf-8")
            append_jsonl(errors, _error_entry(item, settings.config_hash))
    finally:
        if errors is not None:
            errors.close()


def _error_entry(item: _Finished, config_hash: str) -> dict[str, Any]:
    job, result = item.job, item.result
    return {
        "time": now_iso(),
        "source": job.problem.source,
        "id": job.problem.id,
        "rollout": job.rollout,
        "seed": job.seed,
        "config_hash": config_hash,
        "error": item.error,
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


# --------------------------------------------------------------------------- building from flags


@dataclass
class Components:
    """The live objects a run needs, built from flags."""

    reasoner: EndpointPool
    tokenizer: Tokenizer
    cleaner: Cleaner | None
    pools: tuple[EndpointPool, ...]

    async def aclose(self) -> None:
        for pool in self.pools:
            await pool.aclose()


def _endpoints(args: argparse.Namespace) -> list[str]:
    endpoints = [normalize_endpoint(e) for e in args.endpoint]
    if args.endpoints_file:
        endpoints += read_endpoints_file(args.endpoints_file)
    return list(dict.fromkeys(endpoints))


def _remote_backends(kind: str, endpoints: list[str], args: argparse.Namespace, tokenizer: Tokenizer) -> list[Backend]:
    """One fail-fast client per endpoint: the pool retries elsewhere (see freelm.backends.pool)."""
    from freelm.backends import get_backend_kind

    return [get_backend_kind(kind).from_flags(args, url, tokenizer) for url in endpoints]


def build_components(args: argparse.Namespace, tokenizer: Tokenizer | None = None) -> Components:
    """Backends, pools, tokenizer and cleaner; loading a local model happens here (slow, after all checks).

    ``tokenizer`` overrides ``--tokenizer`` for remote backends (benchmarks with a model-free server).
    """
    pool_options = {"max_retries": args.max_retries, "down_wait": args.down_wait}
    if not get_backend_kind(args.backend).remote:
        local = get_backend_kind(args.backend).from_flags(args)
        reasoner = EndpointPool([local], name=args.backend, **pool_options)
        tokenizer = local.tokenizer
    else:
        tokenizer = tokenizer or _load_tokenizer(args.tokenizer or args.model)
        backends = _remote_backends(args.backend, _endpoints(args), args, tokenizer)
        reasoner = EndpointPool(backends, name="reasoner", **pool_options)
    pools = [reasoner]
    cleaner: Cleaner | None = None
    if args.mode == "freelm":
        entry = get_cleaner(args.cleaner)
        components: dict[str, Any] = {"tokenizer": tokenizer}
        if "backend" in entry.components:  # only a cleaner that calls a model gets (or needs) an endpoint pool
            components["backend"] = reasoner
            if args.cleaner_endpoint:
                urls = list(dict.fromkeys(normalize_endpoint(e, "--cleaner-endpoint") for e in args.cleaner_endpoint))
                kind = args.cleaner_backend or (args.backend if get_backend_kind(args.backend).remote else "sglang")
                components["backend"] = EndpointPool(
                    _remote_backends(kind, urls, args, tokenizer), name="cleaner", **pool_options
                )
                pools.append(components["backend"])
        cleaner = entry.build(args, **components)
    return Components(reasoner=reasoner, tokenizer=tokenizer, cleaner=cleaner, pools=tuple(pools))


async def served_limits(pool: EndpointPool, context_limit: int) -> ServerLimits:
    """What a pool's servers serve: the tightest window over its endpoints, and whether all honour seeds.

    Each endpoint is asked (SGLang ``/server_info``, the OpenAI route's
    ``/v1/models``; the in-process model's ``max_position_embeddings``). An
    endpoint that reports no window is taken to serve ``context_limit`` under
    SGLang's margins, the strictest rules known, so no request is one a real
    server refuses.
    """
    reports: list[ServerLimits] = []
    for state in pool.endpoints:
        backend = state.backend
        if not hasattr(backend, "server_limits"):  # e.g. a test double: it says nothing
            reports.append(ServerLimits())
            continue
        try:
            reports.append(await backend.server_limits())
        except BackendError as exc:
            print(f"warning: {backend.name}: cannot read its limits ({exc})", file=sys.stderr)
            reports.append(ServerLimits())
    fallback = ContextWindow.sglang(context_limit, source="--context-limit (the server reports no window)")
    window: ContextWindow | None = None
    for report in reports:
        window = (report.window or fallback).narrow(window)
    flags = {key: [getattr(r, key) for r in reports] for key in ("seeds_honoured", "cache_report")}
    return ServerLimits(
        window=window,
        seeds_honoured=False if False in flags["seeds_honoured"] else (True if all(flags["seeds_honoured"]) else None),
        cache_report=False if False in flags["cache_report"] else (True if all(flags["cache_report"]) else None),
        min_p_forbidden=any(r.min_p_forbidden for r in reports),
        source=", ".join(r.source for r in reports if r.source),
    )


async def _learn_limits(
    args: argparse.Namespace, components: Components
) -> tuple[ContextWindow | None, dict[str, Any]]:
    """Ask the servers for their windows and seed handling; size the cleaner to its window; warn once.

    Raises ValueError for a combination the server would crash on (SGLang's
    deterministic sampler asserts on ``min_p > 0``, ``layers/sampler.py``).
    """
    reasoner = await served_limits(components.reasoner, args.context_limit)
    served: dict[str, Any] = {"reasoner": reasoner.to_dict(), "seeds_honoured": reasoner.seeds_honoured}
    cleaner = components.cleaner
    if hasattr(cleaner, "window") and hasattr(cleaner, "backend"):  # a model-calling cleaner sized to its window
        cleaning = reasoner if cleaner.backend is components.reasoner else None
        if cleaning is None and isinstance(cleaner.backend, EndpointPool):
            cleaning = await served_limits(cleaner.backend, args.context_limit)
        if cleaning is not None:
            cleaner.window = cleaning.window
            served["cleaner"] = cleaning.to_dict()
    if reasoner.min_p_forbidden and args.min_p > 0:
        raise ValueError(
            f"--min-p {args.min_p}: the reasoner runs with --enable-deterministic-inference, whose sampler asserts "
            "on min_p > 0 (SGLang layers/sampler.py); use --min-p 0 or serve without deterministic inference"
        )
    if reasoner.window is not None and reasoner.window.max_total + 1 < args.context_limit:
        print(
            f"warning: the reasoner serves at most {reasoner.window.max_total} tokens per request "
            f"({reasoner.window.source}), less than --context-limit {args.context_limit}: rollouts end "
            "context_overflow there",
            file=sys.stderr,
        )
    if reasoner.seeds_honoured is False and args.temperature > 0:
        print(
            "warning: the reasoner ignores per-request seeds (SGLang honours sampling_seed only with "
            "--enable-deterministic-inference): rollouts are not reproducible from --seed",
            file=sys.stderr,
        )
    return reasoner.window, served


def _load_tokenizer(path: Path) -> Tokenizer:
    if not Path(path).is_dir():  # never let a typo become a Hub download
        raise ValueError(f"--tokenizer {path}: not a directory")
    try:
        return Tokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer ({exc})") from exc


def _manifest_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}


async def _run_async(
    args: argparse.Namespace,
    components: Components,
    problems: list[Problem],
    settings: RunSettings,
    existing: ExistingOutput,
    run_id: str,
) -> int:
    try:
        for pool in components.pools:
            if await pool.check_health() == 0:
                reasons = "; ".join(f"{e.backend.name}: {e.last_error}" for e in pool.endpoints)
                print(f"waiting up to {pool.down_wait:g}s for {pool.name} ({reasons})", file=sys.stderr)
                if not await pool.wait_until_up():
                    print(f"error: no healthy endpoint in {pool.name} after {pool.down_wait:g}s", file=sys.stderr)
                    return 2
        try:
            endpoints = await _startup_checks(components)
            window, served = await _learn_limits(args, components)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        summary = await run_batch(
            problems, output=args.output, settings=settings, config=loop_config(args),
            reasoner=components.reasoner, tokenizer=components.tokenizer, cleaner=components.cleaner,
            n_rollouts=args.n_rollouts, concurrency=args.concurrency, existing=existing,
            pools=components.pools, manifest_config=_manifest_config(args),
            progress=False if args.no_progress else None, window=window, served={**served, "endpoints": endpoints},
            shard=Shard(args.shard_index, args.num_shards),
            run_id=run_id,
        )  # fmt: skip
    finally:
        await components.aclose()
    print(summary.format())
    if summary.failed:
        print(
            f"{summary.failed} rollout(s) failed (see {errors_path(args.output)}); re-run the same command to retry them"
        )
        return 1
    return 0


async def _startup_checks(components: Components) -> dict[str, Any]:
    """Before the first rollout: each server serves the model names the run uses, in the prompt kind it takes.

    Returns what each checked endpoint reported (served models, prompt kind, the sampling fields sent and
    the server's own defaults) for the manifest; raises ValueError with the reason otherwise. The window
    is :func:`served_limits`'s.
    """
    served: dict[str, Any] = {}
    cleaner = components.cleaner
    probe_ids = components.tokenizer.encode("Hello")
    for pool in components.pools:
        adapters: list[str | None] = [None] if pool is components.reasoner else []
        if isinstance(cleaner, LoRACleaner) and cleaner.backend is pool:
            adapters.append(cleaner.adapter)
        for endpoint in pool.endpoints:
            check = getattr(endpoint.backend, "startup_check", None)
            if check is None or not endpoint.up:
                continue
            try:
                served[endpoint.backend.name] = await check(adapters, probe_ids if None in adapters else ())
            except BackendError as exc:
                raise ValueError(str(exc)) from None
    return served


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 all rollouts present, 1 some failed or a write failed (re-run resumes), 2 bad input or config
    (including another runner on the same output), 130 interrupted."""
    try:
        validate_args(args)
        args.output = Shard(args.shard_index, args.num_shards).output(args.output)  # each shard its own files
        settings = run_settings(args)
        if get_backend_kind(args.backend).remote:
            _endpoints(args)
        problems = load_problem_sources(args.data, split=args.split, limit=args.limit)
        check_output_writable(args.output)
        lock = OutputLock(args.output).acquire()
    except ValueError as exc:  # includes OutputLocked / OutputUnwritable: nothing was sent or written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run_locked(args, settings, problems)
    finally:
        lock.release()


def _run_locked(args: argparse.Namespace, settings: RunSettings, problems: list[Problem]) -> int:
    """Everything after the output lock: read what the output holds only now, so no other runner can change it."""
    run_id = uuid.uuid4().hex
    try:
        existing = inspect_output(args.output, settings, force=args.force)
        if not existing.mismatch:
            record_start(args.output, settings, run_id)  # counted in previous_runs even if killed while loading
        components = build_components(args)
    except ValueError as exc:  # includes ConfigMismatch: nothing was sent
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run_async(args, components, problems, settings, existing, run_id))
    except KeyboardInterrupt:
        print("interrupted: finished rollouts are saved; re-run the same command to resume", file=sys.stderr)
        return 130
    except OutputWriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runner.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
