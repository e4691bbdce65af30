"""The live objects of a run, built from its :class:`~freelm.run.spec.RunSpec`: backends, pools, cleaner.

Everything here talks to servers or loads a model, so it runs after every
check that needs neither (flags, data, the output lock): a bad flag never costs
a model load. What the servers report about themselves (windows, seed
handling, served models) is read here too, before the first rollout.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freelm.backends import BackendArgs, BackendKind, get_backend_kind
from freelm.backends.base import Backend, BackendError, ContextWindow, ServerLimits, TransientBackendError
from freelm.backends.pool import EndpointPool, EndpointState
from freelm.cleaners.base import Cleaner
from freelm.cleaners.registry import get_cleaner
from freelm.run.spec import RunSpec
from freelm.tokenizer import Tokenizer


@dataclass
class Components:
    """The live objects a run needs: the reasoner's pool, the tokenizer, the cleaner and every pool to close."""

    reasoner: EndpointPool
    tokenizer: Tokenizer
    cleaner: Cleaner | None
    pools: tuple[EndpointPool, ...]
    #: the pool the cleaner calls (the reasoner's, or --cleaner-endpoint's); None: no cleaner, or one calling no model
    cleaner_pool: EndpointPool | None = None

    async def aclose(self) -> None:
        """Close every pool, even when closing one fails (the first failure is raised after)."""
        results = await asyncio.gather(*(pool.aclose() for pool in self.pools), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


def backend_args(spec: RunSpec, kind: BackendKind, url: str | None = None, tokenizer: Any = None) -> BackendArgs:
    """The record ``kind`` is built from for this run (one per endpoint of a remote kind).

    Remote clients fail fast (``max_retries=0``): the endpoint pool retries on
    another endpoint (see freelm.backends.pool). An in-process engine loads the
    ``--adapter`` directory under the name the run's cleaner calls, when that
    cleaner calls it on this engine (not on --cleaner-endpoint servers).
    """
    adapter = spec.cleaner_adapter
    serves_cleaner = not kind.remote and not spec.cleaner_endpoints
    return BackendArgs(
        url=url, timeout=spec.timeout, max_retries=0, concurrency=spec.concurrency, tokenizer=tokenizer,
        model_dir=None if kind.remote else spec.model,
        adapters={adapter: spec.adapter} if serves_cleaner and adapter is not None and spec.adapter else {},
        flags={flag.dest: spec.backend_options[flag.dest] for flag in kind.flags},
    )  # fmt: skip


def _remote_pool(
    spec: RunSpec, kind_name: str, endpoints: tuple[str, ...], tokenizer: Tokenizer, name: str
) -> EndpointPool:
    kind = get_backend_kind(kind_name)
    backends = [kind.build(backend_args(spec, kind, url, tokenizer)) for url in endpoints]
    return EndpointPool(backends, remote=kind.remote, name=name, max_retries=spec.max_retries, down_wait=spec.down_wait)


def build_components(spec: RunSpec, tokenizer: Tokenizer | None = None) -> Components:
    """Backends, pools, tokenizer and cleaner; loading a local model happens here (slow, after all checks).

    ``tokenizer`` overrides ``--tokenizer`` for remote backends (benchmarks with a model-free server).
    """
    kind = get_backend_kind(spec.backend)
    if not kind.remote:
        local = kind.build(backend_args(spec, kind))
        reasoner = EndpointPool(
            [local], remote=False, name=spec.backend, max_retries=spec.max_retries, down_wait=spec.down_wait
        )
        tokenizer = local.tokenizer
    else:
        tokenizer = tokenizer or load_tokenizer(spec.tokenizer)
        reasoner = _remote_pool(spec, spec.backend, spec.endpoints, tokenizer, "reasoner")
    pools = [reasoner]
    cleaner: Cleaner | None = None
    cleaner_pool: EndpointPool | None = None
    if spec.mode == "freelm":
        entry = get_cleaner(spec.cleaner)
        components: dict[str, Any] = {"tokenizer": tokenizer}
        if entry.calls_model:  # only a cleaner that calls a model gets (or needs) an endpoint pool
            cleaner_pool = reasoner
            if spec.cleaner_endpoints:
                cleaner_pool = _remote_pool(spec, spec.cleaner_backend, spec.cleaner_endpoints, tokenizer, "cleaner")
                pools.append(cleaner_pool)
            components["backend"] = cleaner_pool
        cleaner = entry.build(spec.cleaner_options, **components)
    return Components(
        reasoner=reasoner, tokenizer=tokenizer, cleaner=cleaner, pools=tuple(pools), cleaner_pool=cleaner_pool
    )


def load_tokenizer(path: Path | None) -> Tokenizer:
    if path is None or not Path(path).is_dir():  # never let a typo become a Hub download
        raise ValueError(f"--tokenizer {path}: not a directory")
    try:
        return Tokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--tokenizer {path}: cannot load a tokenizer ({exc})") from exc


async def check_health(components: Components) -> None:
    """Every endpoint of every pool probed at once (short deadlines); a pool with none up waits ``--down-wait``.

    An endpoint that fails its probe (down, still loading, or accepting
    connections and never answering) is skipped with a warning while others of
    its pool are up: it rejoins when it answers and passes the start-up checks
    again (:func:`vet_returning_endpoints`). Raises ValueError when a pool has
    no endpoint up after ``--down-wait`` seconds.
    """
    pools = components.pools
    await asyncio.gather(*(pool.check_health() for pool in pools))
    for pool in pools:
        if pool.endpoints_up == 0:
            print(f"waiting up to {pool.down_wait:g}s for {pool.name} ({_reasons(pool)})", file=sys.stderr)
            if not await pool.wait_until_up():
                raise ValueError(f"no healthy endpoint in {pool.name} after {pool.down_wait:g}s ({_reasons(pool)})")
        for endpoint in pool.endpoints:
            if not endpoint.up:
                _warn_skipped(pool, endpoint)
        if pool.remote:  # until learn_limits holds returning endpoints to what the checks found
            pool.vet = _checks_not_done


async def _checks_not_done(backend: Backend) -> str:
    """An endpoint skipped at start that answers before the start-up checks are done waits for them."""
    return "not re-admitted yet: the run's start-up checks are not done"


def _reasons(pool: EndpointPool) -> str:
    return "; ".join(f"{e.backend.name}: {e.last_error}" for e in pool.endpoints if not e.up)


def _warn_skipped(pool: EndpointPool, endpoint: EndpointState) -> None:
    print(
        f"warning: {pool.name}: skipping {endpoint.backend.name} ({endpoint.last_error}); the run goes on with "
        f"{pool.endpoints_up} of {len(pool.endpoints)} endpoints, and takes it back once it answers and passes "
        "the start-up checks",
        file=sys.stderr,
    )


async def served_limits(pool: EndpointPool, context_limit: int) -> ServerLimits:
    """What a pool's servers serve: the tightest window over its endpoints that are up, and whether all honour seeds.

    Each endpoint is asked at once (SGLang ``/server_info``, the OpenAI route's
    ``/v1/models``; the in-process model's ``max_position_embeddings``), under
    the backends' short probe deadline. An endpoint that reports no window is
    taken to serve ``context_limit`` under SGLang's margins, the strictest
    rules known, so no request is one a real server refuses. An endpoint that
    is down is not asked: it serves nothing until it passes
    :func:`vet_returning_endpoints`' check, which holds it to this window.
    """
    reports = await asyncio.gather(*(_limits(e.backend) for e in pool.endpoints if e.up))
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


async def _limits(backend: Backend) -> ServerLimits:
    """Every kind reports its limits (RemoteBackend, InProcessBackend); one that cannot is taken to say nothing."""
    try:
        return await backend.server_limits()
    except BackendError as exc:
        print(f"warning: {backend.name}: cannot read its limits ({exc})", file=sys.stderr)
        return ServerLimits()


async def learn_limits(spec: RunSpec, components: Components) -> tuple[ContextWindow | None, dict[str, Any]]:
    """Ask the servers for their windows and seed handling; size the cleaner to its window; warn once.

    Raises ValueError for a combination the server would crash on (SGLang's
    deterministic sampler asserts on ``min_p > 0``, ``layers/sampler.py``).
    """
    context_limit, sampling = spec.loop.context_limit, spec.loop.sampling
    reasoner = await served_limits(components.reasoner, context_limit)
    served: dict[str, Any] = {"reasoner": reasoner.to_dict(), "seeds_honoured": reasoner.seeds_honoured}
    windows = {id(components.reasoner): reasoner.window}
    if components.cleaner_pool is not None:  # a model-calling cleaner: sized to its servers' window
        cleaning = reasoner
        if components.cleaner_pool is not components.reasoner:
            cleaning = await served_limits(components.cleaner_pool, context_limit)
            windows[id(components.cleaner_pool)] = cleaning.window
        served["cleaner"] = cleaning.to_dict()
        entry = get_cleaner(spec.cleaner)
        if "window" in entry.components:
            entry.hand_over(components.cleaner, window=cleaning.window)
    if reasoner.min_p_forbidden and sampling.min_p > 0:
        raise ValueError(
            f"--min-p {sampling.min_p}: the reasoner runs with --enable-deterministic-inference, whose sampler "
            "asserts on min_p > 0 (SGLang layers/sampler.py); use --min-p 0 or serve without deterministic inference"
        )
    if reasoner.window is not None and reasoner.window.max_total + 1 < context_limit:
        print(
            f"warning: the reasoner serves at most {reasoner.window.max_total} tokens per request "
            f"({reasoner.window.source}), less than --context-limit {context_limit}: rollouts end "
            "context_overflow there",
            file=sys.stderr,
        )
    if reasoner.seeds_honoured is False and sampling.temperature > 0:
        print(
            "warning: the reasoner ignores per-request seeds (SGLang honours sampling_seed only with "
            "--enable-deterministic-inference): rollouts are not reproducible from --seed",
            file=sys.stderr,
        )
    vet_returning_endpoints(spec, components, windows)
    return reasoner.window, served


def _checks(spec: RunSpec, components: Components, pool: EndpointPool) -> tuple[list[str | None], Sequence[int]]:
    """The model names a pool's endpoints must serve (None: the base model) and the prompt the check sends.

    The reasoner's servers are asked for the base model, the cleaner's for the
    adapter its cleaner declares (``None``, the ICL baseline's base model, is
    asked once where both share a pool).
    """
    adapters: list[str | None] = [None] if pool is components.reasoner else []
    if pool is components.cleaner_pool and spec.cleaner_adapter not in adapters:
        adapters.append(spec.cleaner_adapter)
    return adapters, components.tokenizer.encode("Hello") if None in adapters else ()


async def startup_checks(spec: RunSpec, components: Components) -> dict[str, Any]:
    """Before the first rollout: each server serves the model names the run uses, in the prompt kind it takes.

    Every remote endpoint that is up is checked at once (:func:`_checks`).
    Returns what each reported (served models, prompt kind, the sampling
    fields sent and the server's own defaults) for the manifest. An endpoint
    that does not answer in time (a transient error) is skipped with a
    warning, like a failed health probe; one that answers wrongly (a model or
    adapter it does not serve) raises ValueError with the reason, as does a
    pool left with no endpoint. The window is :func:`served_limits`'s.
    In-process engines load what they serve themselves: there is nothing to ask.
    """
    checked = [
        (pool, endpoint) for pool in components.pools if pool.remote for endpoint in pool.endpoints if endpoint.up
    ]
    results = await asyncio.gather(
        *(endpoint.backend.startup_check(*_checks(spec, components, pool)) for pool, endpoint in checked),
        return_exceptions=True,
    )
    served: dict[str, Any] = {}
    for (pool, endpoint), result in zip(checked, results):
        if isinstance(result, TransientBackendError):
            pool.take_out(endpoint, str(result))
            _warn_skipped(pool, endpoint)
        elif isinstance(result, BackendError):
            raise ValueError(str(result)) from None
        elif isinstance(result, BaseException):
            raise result
        else:
            served[endpoint.backend.name] = result
    for pool in components.pools:
        if pool.endpoints_up == 0:
            raise ValueError(f"no endpoint of {pool.name} passed the start-up checks ({_reasons(pool)})")
    return served


def vet_returning_endpoints(spec: RunSpec, components: Components, windows: dict[int, ContextWindow | None]) -> None:
    """Hold every endpoint that comes back (skipped at start, or restarted mid-run) to what the start-up checks found.

    Before a remote pool re-admits it, it must serve the run's model names
    (:func:`startup_checks`' check) and a window at least the one the run
    was sized to: a server restarted with a smaller window or without the
    adapter stays out, its reason in the manifest's ``last_error``.
    """
    fallback = ContextWindow.sglang(spec.loop.context_limit, source="--context-limit (the server reports no window)")
    for pool in components.pools:
        if not pool.remote:
            continue
        window, (adapters, probe_ids) = windows.get(id(pool)), _checks(spec, components, pool)

        async def vet(backend: Backend, window=window, adapters=adapters, probe_ids=probe_ids) -> str | None:
            try:
                await backend.startup_check(adapters, probe_ids)
                served = (await backend.server_limits()).window or fallback
            except BackendError as exc:
                return f"not re-admitted: {exc}"
            if window is not None and (served.max_input < window.max_input or served.max_total < window.max_total):
                return (
                    f"not re-admitted: it serves {served.max_total} tokens per request ({served.source}), "
                    f"less than the {window.max_total} this run was sized to"
                )
            return None

        pool.vet = vet
