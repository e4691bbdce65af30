"""The live objects of a run, built from its :class:`~freelm.run.spec.RunSpec`: backends, pools, cleaner.

Everything here talks to servers or loads a model, so it runs after every
check that needs neither (flags, data, the output lock): a bad flag never costs
a model load. What the servers report about themselves (windows, seed
handling, served models) is read here too, before the first rollout.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freelm.backends import BackendArgs, BackendKind, get_backend_kind
from freelm.backends.base import BackendError, ContextWindow, ServerLimits
from freelm.backends.pool import EndpointPool
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
        backend = state.backend  # every kind reports its limits (RemoteBackend, InProcessBackend)
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


async def learn_limits(spec: RunSpec, components: Components) -> tuple[ContextWindow | None, dict[str, Any]]:
    """Ask the servers for their windows and seed handling; size the cleaner to its window; warn once.

    Raises ValueError for a combination the server would crash on (SGLang's
    deterministic sampler asserts on ``min_p > 0``, ``layers/sampler.py``).
    """
    context_limit, sampling = spec.loop.context_limit, spec.loop.sampling
    reasoner = await served_limits(components.reasoner, context_limit)
    served: dict[str, Any] = {"reasoner": reasoner.to_dict(), "seeds_honoured": reasoner.seeds_honoured}
    if components.cleaner_pool is not None:  # a model-calling cleaner: sized to its servers' window
        cleaning = reasoner
        if components.cleaner_pool is not components.reasoner:
            cleaning = await served_limits(components.cleaner_pool, context_limit)
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
    return reasoner.window, served


async def startup_checks(spec: RunSpec, components: Components) -> dict[str, Any]:
    """Before the first rollout: each server serves the model names the run uses, in the prompt kind it takes.

    The reasoner's servers are asked for the base model, the cleaner's for the
    adapter its cleaner declares (``None``, the ICL baseline's base model, is
    asked once where both share a pool). Returns what each checked endpoint
    reported (served models, prompt kind, the sampling fields sent and the
    server's own defaults) for the manifest; raises ValueError with the reason
    otherwise. The window is :func:`served_limits`'s. In-process engines load
    what they serve themselves: there is nothing to ask.
    """
    served: dict[str, Any] = {}
    probe_ids = components.tokenizer.encode("Hello")
    for pool in components.pools:
        if not pool.remote:
            continue
        adapters: list[str | None] = [None] if pool is components.reasoner else []
        if pool is components.cleaner_pool and spec.cleaner_adapter not in adapters:
            adapters.append(spec.cleaner_adapter)
        for endpoint in pool.endpoints:
            if not endpoint.up:
                continue
            try:
                served[endpoint.backend.name] = await endpoint.backend.startup_check(
                    adapters, probe_ids if None in adapters else ()
                )
            except BackendError as exc:
                raise ValueError(str(exc)) from None
    return served
