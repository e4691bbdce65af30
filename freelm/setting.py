"""A setting: one dataclass field that is at once a runner flag, a checked bound and a key of the config hash.

Declared once, in the field's metadata (:func:`setting`), and read by
everything that needs it: the runner's flags and their help
(:func:`add_arguments`), the checks before anything runs (:func:`check`),
the constructor arguments (:func:`values`) and the results-deciding config
hashed into every output line (:func:`config`). So what is run, what is
checked, what is hashed and what the flag offers cannot disagree. The shape is
vLLM's ``EngineArgs.add_cli_args`` (a field's metadata makes its flag) and
kvpress' presses (a policy is a dataclass whose fields are its settings). Used
by the loop (:class:`~freelm.loop.LoopConfig`), sampling
(:class:`~freelm.backends.base.SamplingParams`) and every cleaner
(:mod:`freelm.cleaners.registry`).

A dataclass field whose value is itself a dataclass with settings (the loop's
``sampling``) is a group: its settings are hashed under the field's name.
Pure Python: no import of anything in this package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass
from typing import Any

_SETTING = "freelm.setting"
_GROUP = "freelm.settings_group"


@dataclass(frozen=True)
class Setting:
    """How one field appears on the command line, in the checks and in the config hash (``field.metadata``)."""

    help: str
    flag: str | None = None  # None: not settable from the runner, hashed at its default
    type: Callable[[str], Any] | None = None  # default: the type of the default value
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None  # checked before anything runs (``check``)
    maximum: float | None = None
    above: bool = False  # the minimum itself is out of bounds ("> minimum")
    hash_key: str | None = None  # default: the field's name
    #: ``(value, every setting's value by field name) -> hashed value``, e.g. a file's digest instead of its path
    hash_value: Callable[[Any, dict[str, Any]], Any] | None = None
    #: False: left out of the hash while at its default, so a setting added later keeps every earlier hash
    hash_default: bool = True
    #: decides results only when a cleaner runs: left out of a run's hash without one (``config(cleaning=False)``)
    cleaning: bool = False

    @property
    def dest(self) -> str:
        assert self.flag is not None
        return self.flag.lstrip("-").replace("-", "_")

    def out_of_bounds(self, value: Any) -> str | None:
        """``"must be >= 1, got 0"`` when ``value`` is outside the bounds or choices; None inside them (or None)."""
        if value is not None and self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if value is None or (self.minimum is None and self.maximum is None):
            return None
        low = self.minimum is None or (value > self.minimum if self.above else value >= self.minimum)
        high = self.maximum is None or value <= self.maximum
        if low and high:
            return None
        if self.minimum is not None and self.maximum is not None:
            return f"must be in {'(' if self.above else '['}{self.minimum}, {self.maximum}], got {value}"
        if self.minimum is not None:
            return f"must be {'>' if self.above else '>='} {self.minimum}, got {value}"
        return f"must be <= {self.maximum}, got {value}"


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field that is a results-deciding setting (see :class:`Setting` for ``spec``)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_SETTING: Setting(**spec)})


@dataclass(frozen=True)
class Group:
    """A field holding another dataclass of settings (the loop's ``sampling``): its flags get a help section."""

    cls: type
    title: str  # the section of ``runner.py --help`` its flags are listed under


def group(cls: type, title: str) -> Any:
    """A dataclass field holding a ``cls`` of settings, hashed as a nested object under the field's name."""
    return dataclasses.field(default_factory=cls, metadata={_GROUP: Group(cls, title)})


def field(cls: type, name: str) -> dataclasses.Field:
    """The field ``name`` of the dataclass ``cls``."""
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def declaration(f: dataclasses.Field) -> Setting | None:
    """The :class:`Setting` a field declares; None for a field that is no setting."""
    return f.metadata.get(_SETTING)


def default(f: dataclasses.Field) -> Any:
    """A field's default value (built afresh from its factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def settings(cls: type) -> list[tuple[dataclasses.Field, Setting]]:
    """The fields of ``cls`` that are settings, with their declarations, in field order (groups not entered)."""
    return [(f, f.metadata[_SETTING]) for f in dataclasses.fields(cls) if _SETTING in f.metadata]


def groups(cls: type) -> list[tuple[dataclasses.Field, Group]]:
    """The fields of ``cls`` that hold a dataclass of settings, with their :class:`Group`."""
    return [(f, f.metadata[_GROUP]) for f in dataclasses.fields(cls) if _GROUP in f.metadata]


def flags(cls: type) -> Iterator[tuple[dataclasses.Field, Setting]]:
    """Every setting of ``cls`` and of its groups that has a runner flag."""
    for f, s in settings(cls):
        if s.flag is not None:
            yield f, s
    for _, inner in groups(cls):
        yield from flags(inner.cls)


def add_argument(parser: Any, f: dataclasses.Field, s: Setting, help_prefix: str = "") -> None:
    """The runner flag of one setting (its default, type and metavar read off the field)."""
    value = default(f)
    kind = s.type or (type(value) if value is not None else str)
    parser.add_argument(
        s.flag, dest=s.dest, type=kind, default=value, choices=s.choices,
        metavar=s.metavar or (None if s.choices else "N" if kind is int else "VALUE"), help=help_prefix + s.help,
    )  # fmt: skip


def add_arguments(parser: Any, section: Any, cls: type) -> None:
    """``cls``'s flags into ``section`` (an argument group of ``parser``), each group's into a section of its own."""
    for f, s in settings(cls):
        if s.flag is not None:
            add_argument(section, f, s)
    for _, inner in groups(cls):
        add_arguments(parser, parser.add_argument_group(inner.title), inner.cls)


def values(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments of ``cls`` from flag values (by destination); fixed settings keep their defaults."""
    out = {f.name: given[s.dest] for f, s in settings(cls) if s.flag is not None}
    out.update({f.name: inner.cls(**values(inner.cls, given)) for f, inner in groups(cls)})
    return out


def check(cls: type, given: Mapping[str, Any]) -> None:
    """Every bound of ``cls``'s flags (and its groups'), from flag values; raises ValueError naming the flag."""
    for _, s in flags(cls):
        problem = s.out_of_bounds(given[s.dest])
        if problem:
            raise ValueError(f"{s.flag} {problem}")


def check_fields(obj: Any) -> None:
    """Every bound of a built ``obj`` (a direct construction, no flags); raises ValueError naming ``Class.field``."""
    for f, s in settings(type(obj)):
        problem = s.out_of_bounds(getattr(obj, f.name))
        if problem:
            raise ValueError(f"{type(obj).__name__}.{f.name} {problem}")


def config(cls: type, given: Mapping[str, Any], cleaning: bool = True) -> dict[str, Any]:
    """The hashed part of ``cls`` for these field values (missing ones at their defaults); may raise ValueError.

    ``cleaning=False`` leaves out the settings that decide results only when a
    cleaner runs. A group is hashed as a nested object under its field's name.
    """
    every = {f.name: given[f.name] if f.name in given else default(f) for f, _ in settings(cls)}
    out: dict[str, Any] = {}
    for f, s in settings(cls):
        value = every[f.name]
        if (s.cleaning and not cleaning) or (not s.hash_default and value == default(f)):
            continue
        out[s.hash_key or f.name] = s.hash_value(value, every) if s.hash_value else _hashable(value)
    for f, inner in groups(cls):
        value = given[f.name] if f.name in given else default(f)
        out[f.name] = config(inner.cls, {g.name: getattr(value, g.name) for g, _ in settings(inner.cls)}, cleaning)
    return out


def config_of(obj: Any, cleaning: bool = True) -> dict[str, Any]:
    """:func:`config` of a built dataclass of settings."""
    return config(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, cleaning)


def _hashable(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value
