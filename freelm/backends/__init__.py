"""Backends: the :class:`~freelm.backends.base.Backend` interface and its implementations.

Implementations are imported lazily by :func:`make_backend` so that choosing the
HTTP client never imports torch (``local``) and vice versa.
"""

from __future__ import annotations

from typing import Any

from freelm.backends.base import (
    Backend,
    BackendError,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    TransientBackendError,
)

BACKEND_KINDS = ("sglang", "openai", "local")


def make_backend(kind: str, **kwargs: Any) -> Backend:
    """Build a backend by kind: ``sglang`` (base_url, ...), ``openai`` (base_url, model, ...), ``local`` (model_dir, ...)."""
    if kind == "sglang":
        from freelm.backends.sglang import SGLangBackend

        return SGLangBackend(**kwargs)
    if kind == "openai":
        from freelm.backends.openai_compat import OpenAIBackend

        return OpenAIBackend(**kwargs)
    if kind == "local":
        from freelm.backends.local import LocalBackend

        return LocalBackend.from_pretrained(**kwargs)
    raise ValueError(f"unknown backend kind {kind!r}; expected one of {', '.join(BACKEND_KINDS)}")


__all__ = [
    "BACKEND_KINDS",
    "Backend",
    "BackendError",
    "GenerateRequest",
    "GenerateResult",
    "SamplingParams",
    "TransientBackendError",
    "make_backend",
]
