"""Backends: the :class:`~freelm.backends.base.Backend` interface and its implementations.

A kind is one entry of :data:`BACKENDS` (name, factory, how the runner's flags
map to its arguments); implementations are imported only when one is built,
so choosing the HTTP client never imports torch (``local``) and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from freelm.backends.base import (
    Backend,
    BackendError,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    TransientBackendError,
)


@dataclass(frozen=True)
class BackendKind:
    """One way to reach a model, selected by name: its factory (imported on first use) and what the runner needs.

    ``options`` turns the runner's flags (and an endpoint URL, for a remote
    kind) into the factory's keyword arguments, so the runner builds every kind
    the same way and ``--backend``, ``--cleaner-backend`` and the flag checks
    all read this table.
    """

    name: str
    factory: str  # "module:attribute", e.g. a class or its from_pretrained
    remote: bool  # reached at --endpoint URLs (else in-process, from --model)
    options: Callable[[argparse.Namespace, str | None, Any], dict[str, Any]]  # (flags, url, tokenizer)
    needs: tuple[str, ...] = ()  # runner flags it cannot run without, e.g. ("--served-model",)
    help: str = ""

    def make(self, **kwargs: Any) -> Backend:
        module, _, attribute = self.factory.partition(":")
        factory: Any = importlib.import_module(module)
        for part in attribute.split("."):
            factory = getattr(factory, part)
        return factory(**kwargs)

    def from_flags(self, args: argparse.Namespace, url: str | None = None, tokenizer: Any = None) -> Backend:
        """``tokenizer`` is the run's (remote kinds; a text-only server is sent decoded prompts)."""
        return self.make(**self.options(args, url, tokenizer))


def _openai_url(url: str) -> str:
    """``http://host:port`` -> ``.../v1``; a URL with a path is taken as the API root already."""
    return url if url.split("://", 1)[1].partition("/")[2] else f"{url}/v1"


# Runner clients fail fast (max_retries=0): the endpoint pool retries elsewhere (freelm.backends.pool).
BACKENDS: dict[str, BackendKind] = {
    kind.name: kind
    for kind in (
        BackendKind(
            "sglang", "freelm.backends.sglang:SGLangBackend", remote=True, help="SGLang native /generate",
            options=lambda args, url, tokenizer: {
                "base_url": url, "timeout": args.timeout, "max_retries": 0,
                "max_connections": max(512, args.concurrency),
            },
        ),
        BackendKind(
            "openai", "freelm.backends.openai_compat:OpenAIBackend", remote=True, needs=("--served-model",),
            help="any OpenAI-compatible /v1/completions",
            options=lambda args, url, tokenizer: {
                "base_url": _openai_url(url), "model": args.served_model, "api_key_env": args.api_key_env,
                "timeout": args.timeout, "max_retries": 0, "text_prompts": args.text_prompts,
                "decode": tokenizer.decode if tokenizer is not None else None,
            },
        ),
        BackendKind(
            "local", "freelm.backends.local:LocalBackend.from_pretrained", remote=False,
            help="in-process transformers + peft",
            # concurrent rollouts' requests are decoded together, like a server's scheduler would
            options=lambda args, url, tokenizer: {
                "model_dir": args.model, "max_batch": args.concurrency,
                "adapters": {args.adapter_name: args.adapter} if args.adapter else None,
            },
        ),
    )
}  # fmt: skip


def get_backend_kind(name: str) -> BackendKind:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend kind {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def make_backend(kind: str, **kwargs: Any) -> Backend:
    """Build a backend by kind: ``sglang`` (base_url, ...), ``openai`` (base_url, model, ...), ``local`` (model_dir, ...)."""
    return get_backend_kind(kind).make(**kwargs)


__all__ = [
    "BACKENDS",
    "BackendKind",
    "Backend",
    "BackendError",
    "GenerateRequest",
    "GenerateResult",
    "SamplingParams",
    "TransientBackendError",
    "get_backend_kind",
    "make_backend",
]
