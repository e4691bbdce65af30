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

from freelm.backends import get_backend_kind
from freelm.backends.base import Backend, BackendError, ContextWindow, ServerLimits
from freelm.backends.pool import EndpointPool
from freelm.cleaners.base import Cleaner
from freelm.cleaners.lora import LoRACleaner
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

    async def aclose(self) -> None:
        """Close every pool, even when closing one fails (the first failure is raised after)."""
        results = await asyncio.gather(*(pool.aclose() for pool in self.pools), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


def _remote_backends(kind: str, endpoints: tuple[str, ...], spec: RunSpec, tokenizer: Tokenizer) -> list[Backend]:
    """One fail-fast client per endpoint: the pool retries elsewhere (see freelm.backends.pool)."""
    return [get_backend_kind(kind).from_spec(spec, url, tokenizer) for url in endpoints]


def build_components(spec: RunSpec, tokenizer: Tokenizer | None = None) -> Components:
    """Backends, pools, tokenizer and cleaner; loading a local model happens here (slow, after all checks).

    ``tokenizer`` overrides ``--tokenizer`` for remote backends (benchmarks with a model-free server).
    """
    pool_options = {"max_retries": spec.max_retries, "down_wait": spec.down_wait}
    if not spec.remote:
        local = get_backend_kind(spec.backend).from_spec(spec)
        reasoner = EndpointPool([local], name=spec.backend, **pool_options)
        tokenizer = local.tokenizer
    else:
        tokenizer = tokenizer or load_tokenizer(spec.tokenizer)
        backends = _remote_backends(spec.backend, spec.endpoints, spec, tokenizer)
        reasoner = EndpointPool(backends, name="reasoner", **pool_options)
    pools = [reasoner]
    cleaner: Cleaner | None = None
    if spec.mode == "freelm":
        entry = get_cleaner(spec.cleaner)
        components: dict[str, Any] = {"tokenizer": tokenizer}
        if "backend" in entry.components:  # only a cleaner that calls a model gets (or needs) an endpoint pool
            components["backend"] = reasoner
            if spec.cleaner_endpoints:
                components["backend"] = EndpointPool(
                    _remote_backends(spec.cleaner_backend, spec.cleaner_endpoints, spec, tokenizer),
                    name="cleaner", **pool_options,
                )  # fmt: skip
                pools.append(components["backend"])
        cleaner = entry.build(spec.cleaner_options, **components)
    return Components(reasoner=reasoner, tokenizer=tokenizer, cleaner=cleaner, pools=tuple(pools))


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


async def learn_limits(spec: RunSpec, components: Components) -> tuple[ContextWindow | None, dict[str, Any]]:
    """Ask the servers for their windows and seed handling; size the cleaner to its window; warn once.

    Raises ValueError for a combination the server would crash on (SGLang's
    deterministic sampler asserts on ``min_p > 0``, ``layers/sampler.py``).
    """
    context_limit, sampling = spec.loop.context_limit, spec.loop.sampling
    reasoner = await served_limits(components.reasoner, context_limit)
    served: dict[str, Any] = {"reasoner": reasoner.to_dict(), "seeds_honoured": reasoner.seeds_honoured}
    cleaner = components.cleaner
    if hasattr(cleaner, "window") and hasattr(cleaner, "backend"):  # a model-calling cleaner sized to its window
        cleaning = reasoner if cleaner.backend is components.reasoner else None
        if cleaning is None and isinstance(cleaner.backend, EndpointPool):
            cleaning = await served_limits(cleaner.backend, context_limit)
        if cleaning is not None:
            cleaner.window = cleaning.window
            served["cleaner"] = cleaning.to_dict()
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


async def startup_checks(components: Components) -> dict[str, Any]:
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
        if isinstance(cleaner, LoRACleaner) and cleaner.backend is pool and cleaner.adapter not in adapters:
            adapters.append(cleaner.adapter)  # the ICL cleaner's base model is the reasoner's: checked once
        for endpoint in pool.endpoints:
            check = getattr(endpoint.backend, "startup_check", None)
            if check is None or not endpoint.up:
                continue
            try:
                served[endpoint.backend.name] = await check(adapters, probe_ids if None in adapters else ())
            except BackendError as exc:
                raise ValueError(str(exc)) from None
    return served
