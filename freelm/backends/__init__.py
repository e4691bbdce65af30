"""Backends: the :class:`~freelm.backends.base.Backend` interface, and the registry of its kinds.

A kind is one module of this package that calls :func:`register_backend` with
its :class:`BackendKind` (name, factory, remote or in-process, the runner flags
it needs or brings, how a :class:`BackendArgs` record becomes its arguments).
The modules are imported on first use (:func:`backend_kinds`,
:func:`get_backend_kind`), so ``import freelm.backends`` stays cheap and adding
a backend is adding one file: ``--backend``, ``--cleaner-backend``, the flag
checks and construction all read the registry. Keep a backend module's heavy
imports (torch, an SDK) inside its functions: discovery imports every module,
and only the chosen kind is built. The shape is the cleaner registry's
(:mod:`freelm.cleaners.registry`) and NeMo-Skills' ``get_model(server_type,
**kwargs)``: a kind takes plain arguments, never the runner's objects, so
nothing here imports :mod:`freelm.run` (docs/backends.md, "Writing a backend").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freelm.backends.base import (
    Backend,
    BackendError,
    GenerateRequest,
    GenerateResult,
    InProcessBackend,
    RemoteBackend,
    SamplingParams,
    TransientBackendError,
    missing_members,
)
from freelm.discovery import import_submodules

if TYPE_CHECKING:
    from freelm.tokenizer import Tokenizer


@dataclass(frozen=True)
class BackendArgs:
    """Everything a kind may be built from, as plain values: the run package fills it, the kind picks its part.

    The runner builds one per endpoint (a remote kind) or one for the engine
    (an in-process kind); benchmarks and tests build their own. A kind's
    ``options`` function turns it into its factory's keyword arguments.
    """

    url: str | None = None  # the endpoint (a remote kind); None in-process
    timeout: float = 600.0  # seconds per request
    #: the client's own retries of one request; the runner gives 0, since its endpoint pool retries elsewhere
    max_retries: int = 0
    concurrency: int = 1  # requests the run may have in flight at once: a client's connections, an engine's batch
    #: the run's tokenizer (remote kinds: a text-only server is sent decoded prompts); in-process kinds load their own
    tokenizer: Tokenizer | None = None
    model_dir: Path | None = None  # an in-process kind's checkpoint directory (--model)
    #: adapters an in-process engine must load, by the name the run calls them (--adapter under the cleaner's name)
    adapters: Mapping[str, Path] = field(default_factory=dict)
    #: the kind's own flags (its :attr:`BackendKind.flags`), by destination
    flags: Mapping[str, Any] = field(default_factory=dict)


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

    ``remote`` decides what the runner asks of it: a remote kind's backends
    implement :class:`~freelm.backends.base.RemoteBackend` (health, server
    limits, startup check) and its pool probes health and detects hangs; an
    in-process kind's backend implements
    :class:`~freelm.backends.base.InProcessBackend`. ``options`` turns a
    :class:`BackendArgs` into the factory's keyword arguments, so the runner
    builds every kind the same way. ``order`` places the kind in
    ``--backend``'s choices (the default first); ties go by name.
    ``evicts``: its backends honour a request's
    :class:`~freelm.backends.base.Eviction` (the ``--resume`` eviction
    strategies); every other kind re-prefills, so the runner refuses them those.
    """

    name: str
    factory: Callable[..., Backend]  # e.g. a class or its from_pretrained
    remote: bool  # reached at --endpoint URLs (else in-process, from --model)
    options: Callable[[BackendArgs], dict[str, Any]]  # the record -> factory kwargs
    needs: tuple[str, ...] = ()  # runner flags it cannot run without, e.g. ("--served-model",)
    flags: tuple[BackendFlag, ...] = ()  # runner flags only this kind reads (their values: BackendArgs.flags)
    help: str = ""
    order: int = 100
    evicts: bool = False

    @property
    def interface(self) -> type:
        """The protocol its backends implement: :class:`RemoteBackend` or :class:`InProcessBackend`."""
        return RemoteBackend if self.remote else InProcessBackend

    def make(self, **kwargs: Any) -> Backend:
        """Build one backend; a backend that lacks part of its kind's interface is refused, by name."""
        backend = self.factory(**kwargs)
        missing = missing_members(backend, self.interface)
        if missing:
            raise TypeError(self._lacks(type(backend).__name__, missing))
        return backend

    def build(self, args: BackendArgs) -> Backend:
        """The backend for a run's record (the runner's way: every kind is built alike)."""
        return self.make(**self.options(args))

    def _lacks(self, what: str, missing: list[str]) -> str:
        return (
            f"backend kind {self.name!r} ({'remote' if self.remote else 'in-process'}): {what} lacks "
            f'{", ".join(missing)} of {self.interface.__name__} (docs/backends.md, "Writing a backend")'
        )


_REGISTRY: dict[str, BackendKind] = {}


def register_backend(kind: BackendKind) -> BackendKind:
    """Add a kind under its name (a backend module calls this once, at import).

    A factory that is a class is held against its kind's interface here, so a
    remote client that forgets ``health()`` fails at import with its name and
    what it lacks; any other factory is checked on what it builds
    (:meth:`BackendKind.make`).
    """
    if isinstance(kind.factory, type):
        missing = missing_members(kind.factory, kind.interface)
        if missing:
            raise TypeError(kind._lacks(kind.factory.__name__, missing))
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
    "BackendArgs",
    "BackendError",
    "BackendFlag",
    "BackendKind",
    "GenerateRequest",
    "GenerateResult",
    "InProcessBackend",
    "RemoteBackend",
    "SamplingParams",
    "TransientBackendError",
    "backend_kinds",
    "get_backend_kind",
    "make_backend",
    "register_backend",
    "unregister_backend",
]
