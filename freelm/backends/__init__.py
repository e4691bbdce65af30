"""Backends: the :class:`~freelm.backends.base.Backend` interface, and the registry of its kinds.

A kind is one module of this package that calls :func:`register_backend` with
its :class:`BackendKind` (name, factory, remote or in-process, the runner flags
it needs or brings, how the run's settings become its arguments). The modules
are imported on first use (:func:`backend_kinds`, :func:`get_backend_kind`), so
``import freelm.backends`` stays cheap and adding a backend is adding one file:
``--backend``, ``--cleaner-backend``, the flag checks and construction all read
the registry. Keep a backend module's heavy imports (torch, an SDK) inside its
functions: discovery imports every module, and only the chosen kind is built.
The shape is the cleaner registry's (:mod:`freelm.cleaners.registry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from freelm.backends.base import (
    Backend,
    BackendError,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    TransientBackendError,
)
from freelm.discovery import import_submodules

if TYPE_CHECKING:
    from freelm.run.spec import RunSpec


@dataclass(frozen=True)
class BackendFlag:
    """A runner flag a kind brings with it (listed under "backends" in ``runner.py --help``)."""

    name: str  # "--served-model"
    help: str
    options: Mapping[str, Any] = field(default_factory=dict)  # further add_argument keywords (metavar, default, action)

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class BackendKind:
    """One way to reach a model, selected by name: its factory and what the runner needs to build it.

    ``options`` turns the run's settings (and an endpoint URL plus the run's
    tokenizer, for a remote kind) into the factory's keyword arguments, so the
    runner builds every kind the same way. ``order`` places the kind in
    ``--backend``'s choices (the default first); ties go by name.
    """

    name: str
    factory: Callable[..., Backend]  # e.g. a class or its from_pretrained
    remote: bool  # reached at --endpoint URLs (else in-process, from --model)
    options: Callable[[RunSpec, str | None, Any], dict[str, Any]]  # (spec, url, tokenizer) -> factory kwargs
    needs: tuple[str, ...] = ()  # runner flags it cannot run without, e.g. ("--served-model",)
    flags: tuple[BackendFlag, ...] = ()  # runner flags only this kind reads (their values: RunSpec.backend_options)
    help: str = ""
    order: int = 100

    def make(self, **kwargs: Any) -> Backend:
        return self.factory(**kwargs)

    def from_spec(self, spec: RunSpec, url: str | None = None, tokenizer: Any = None) -> Backend:
        """``tokenizer`` is the run's (remote kinds; a text-only server is sent decoded prompts)."""
        return self.make(**self.options(spec, url, tokenizer))


_REGISTRY: dict[str, BackendKind] = {}


def register_backend(kind: BackendKind) -> BackendKind:
    """Add a kind under its name (a backend module calls this once, at import)."""
    if kind.name in _REGISTRY and _REGISTRY[kind.name] != kind:
        raise ValueError(f"backend name {kind.name!r} is taken by {_REGISTRY[kind.name].factory!r}")
    _REGISTRY[kind.name] = kind
    return kind


def unregister_backend(name: str) -> None:
    """Remove a kind (tests that register throwaway ones)."""
    _REGISTRY.pop(name, None)


def backend_kinds() -> dict[str, BackendKind]:
    """Every registered kind by name, in ``--backend`` order."""
    import_submodules(__name__)
    return {kind.name: kind for kind in sorted(_REGISTRY.values(), key=lambda k: (k.order, k.name))}


def get_backend_kind(name: str) -> BackendKind:
    kinds = backend_kinds()
    if name not in kinds:
        raise ValueError(f"unknown backend kind {name!r}; expected one of {', '.join(kinds)}")
    return kinds[name]


def make_backend(kind: str, **kwargs: Any) -> Backend:
    """Build a backend by kind: ``sglang`` (base_url, ...), ``openai`` (base_url, model, ...), ``local`` (model_dir, ...)."""
    return get_backend_kind(kind).make(**kwargs)


__all__ = [
    "Backend",
    "BackendError",
    "BackendFlag",
    "BackendKind",
    "GenerateRequest",
    "GenerateResult",
    "SamplingParams",
    "TransientBackendError",
    "backend_kinds",
    "get_backend_kind",
    "make_backend",
    "register_backend",
    "unregister_backend",
]
