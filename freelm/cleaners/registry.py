"""The cleaner registry: a cleaner is one module of this package, registered under its ``name``.

A registered cleaner is a dataclass whose fields say everything the runner needs:

* **settings**, declared with :func:`freelm.setting.setting` (the one mechanism
  the loop and sampling settings use too): each one is at once a runner flag
  (or, without a flag, a fixed value), a key of the cleaner's part of the config
  hash and a constructor argument. All three come from the one field, so what
  is run, what is hashed and what the flag offers cannot disagree;
* **components** (:data:`COMPONENTS`): live objects the runner hands over by
  field name, through this registry (:meth:`CleanerEntry.build`, and
  :meth:`CleanerEntry.hand_over` for what is learned later, the ``window``);
* **the adapter it calls**: a cleaner that calls a model (a ``backend``
  component) declares an ``adapter`` field, the LoRA name it sends (a setting,
  as the Free-Module's ``--adapter-name``) or ``None`` for the base model (the
  ICL baseline). The runner reads that field, never the class, to know which
  model names a run calls (:meth:`CleanerEntry.adapter`);
* anything else keeps its default under the runner (``name``, ...).

The package's modules are imported on first use (:func:`cleaner_names`,
:func:`get_cleaner`, :func:`add_cleaner_arguments`), so adding a cleaner is
adding one file with a ``@register`` class: the ``--cleaner`` choices, its
flags and its hash follow. The shape is kvpress' (one press per file, a
dataclass whose fields are its settings, a name -> press registry) and
NeMo-Skills' (a model class picked by name).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any

from freelm import setting as declared  # the one settings mechanism (loop, sampling, cleaners)
from freelm.cleaners.base import Cleaner
from freelm.discovery import import_submodules
from freelm.setting import Setting, default

#: Live objects a cleaner may ask for by field name (what each is); the runner builds only those asked for.
#: A component field without a default is required at build; one with a default may come later (``hand_over``).
COMPONENTS = {
    "backend": "the endpoint pool it calls: the reasoner's, or --cleaner-endpoint's (declare `adapter` with it)",
    "tokenizer": "the run's tokenizer",
    "window": "the ContextWindow its backend serves, handed over once the servers have reported it",
}

_NOT_CLEANERS = {"base", "prompted", "registry"}  # modules of this package that register no cleaner


@dataclass(frozen=True)
class CleanerEntry:
    """One registered cleaner: its class, and the record label of its runs (``RolloutRecord.mode``)."""

    name: str
    cls: type
    label: str

    @property
    def settings(self) -> list[tuple[dataclasses.Field, Setting]]:
        return declared.settings(self.cls)

    @property
    def flags(self) -> list[tuple[dataclasses.Field, Setting]]:
        return [(f, s) for f, s in self.settings if s.flag is not None]

    @property
    def components(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.cls) if f.name in COMPONENTS]

    @property
    def required_components(self) -> list[str]:
        """The components it cannot be built without (those it declares with no default)."""
        return [f.name for f in dataclasses.fields(self.cls) if f.name in COMPONENTS and default(f) is MISSING]

    @property
    def calls_model(self) -> bool:
        """Whether it calls a model (it declares a ``backend``), so the runner builds it a pool."""
        return "backend" in self.components

    def adapter(self, flags: Mapping[str, Any]) -> str | None:
        """The adapter it calls under these flag values; None for the base model, or for a cleaner calling none."""
        if not self.calls_model:
            return None
        f = declared.field(self.cls, "adapter")
        spec = declared.declaration(f)
        return flags[spec.dest] if spec is not None and spec.flag is not None else default(f)

    def values(self, flags: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments from flag values (by flag destination); fixed settings keep their defaults."""
        return declared.values(self.cls, flags)

    def config(self, flags: Mapping[str, Any]) -> dict[str, Any]:
        """This cleaner's part of the config hash: its name and every setting (may raise ValueError)."""
        return {"name": self.name, **declared.config(self.cls, self.values(flags))}

    def build(self, flags: Mapping[str, Any], **components: Any) -> Cleaner:
        """The cleaner of these flag values, given the components it declares (others given are not its own)."""
        missing = sorted(set(self.required_components) - set(components))
        if missing:
            raise ValueError(f"cleaner {self.name!r} needs {', '.join(missing)}")
        given = {name: components[name] for name in self.components if name in components}
        return self.cls(**given, **self.values(flags))

    def hand_over(self, cleaner: Cleaner, **components: Any) -> None:
        """Give a built cleaner a component learned after it was built (the ``window``, from the servers)."""
        for name, value in components.items():
            if name not in self.components:
                raise ValueError(f"cleaner {self.name!r} declares no component {name!r}")
            setattr(cleaner, name, value)


_REGISTRY: dict[str, CleanerEntry] = {}


def register(cls: type | None = None, *, label: str | None = None) -> Any:
    """Class decorator: register a cleaner dataclass under the default of its ``name`` field.

    ``label`` is what its records are called (default: the name); the Free-Module's is ``freelm``.
    """

    def add(cls: type) -> type:
        if not dataclasses.is_dataclass(cls) or not callable(getattr(cls, "clean", None)):
            raise TypeError(f"{cls.__qualname__}: a cleaner is a dataclass with an async clean() method")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if "name" not in names or not isinstance(names["name"].default, str):
            raise TypeError(f"{cls.__qualname__}: a cleaner needs a `name: str = ...` field (its registry name)")
        name = names["name"].default
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"cleaner name {name!r} is taken by {_REGISTRY[name].cls.__qualname__}")
        for f in names.values():
            if f.name not in COMPONENTS and declared.declaration(f) is None and default(f) is MISSING:
                raise TypeError(f"{cls.__qualname__}.{f.name}: neither a setting, a component nor defaulted")
        if "backend" in names and "adapter" not in names:
            raise TypeError(
                f"{cls.__qualname__}: a cleaner that calls a model (a `backend` component) declares the adapter "
                "it calls: `adapter: str | None` (None: the base model)"
            )
        _REGISTRY[name] = CleanerEntry(name=name, cls=cls, label=label or name)
        return cls

    return add(cls) if cls is not None else add


def unregister(name: str) -> None:
    """Remove a cleaner (tests that register throwaway ones)."""
    _REGISTRY.pop(name, None)


def cleaner_names() -> list[str]:
    import_submodules(__package__, skip=_NOT_CLEANERS)
    return sorted(_REGISTRY)


def get_cleaner(name: str) -> CleanerEntry:
    import_submodules(__package__, skip=_NOT_CLEANERS)
    if name not in _REGISTRY:
        raise ValueError(f"unknown cleaner {name!r}; expected one of {', '.join(cleaner_names())}")
    return _REGISTRY[name]


def add_cleaner_arguments(group: Any) -> None:
    """Every registered cleaner's flags; a flag shared by cleaners (inherited fields) is added once.

    Two cleaners declaring one flag differently is an error here, not a silent override.
    """
    seen: dict[str, tuple[dataclasses.Field, Setting, list[str]]] = {}
    for name in cleaner_names():
        for f, s in get_cleaner(name).flags:
            if s.flag in seen:
                other, spec, users = seen[s.flag]
                if (spec, default(other)) != (s, default(f)):
                    raise ValueError(f"cleaners {users[0]!r} and {name!r} declare {s.flag} differently")
                users.append(name)
            else:
                seen[s.flag] = (f, s, [name])
    for f, s, users in seen.values():
        declared.add_argument(group, f, s, help_prefix=f"--cleaner {'/'.join(users)}: ")


def validate(flags: Mapping[str, Any]) -> None:
    """Every cleaner flag's bounds (``flags``: value by flag destination); raises ValueError naming the flag."""
    for name in cleaner_names():
        declared.check(get_cleaner(name).cls, flags)
