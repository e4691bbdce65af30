"""One validation layer for rows read from disk: per-field types, messages ``field: expected X, got Y``.

Data rows and rollout records come from files people edit, merge and truncate;
a wrong type must stop with the file, line and field (``file:line: rounds[2].clean.applied:
expected integer, got string``), never pass as ``"[1, 2]"`` or crash three
modules later. The schema of a record IS its dataclass: :func:`build` reads
the field annotations (``int``, ``str | None``, ``list[RoundRecord]``,
``tuple[int, int]``, ``Literal[...]``, nested dataclasses), so there is no
second copy of the field list to keep in step. The caller prefixes the
``file:line``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import cache
from typing import Any, Literal, TypeVar, Union

__all__ = ["FieldError", "build", "check_text", "describe", "expect", "json_type"]

T = TypeVar("T")

_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


class FieldError(ValueError):
    """A value of the wrong type (or a missing / unknown field); ``str()`` is ``field: message``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (``[1, 2]`` -> ``list``)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return _JSON_NAMES.get(type(value), type(value).__name__)


def describe(annotation: Any) -> str:
    """A reader's name for what an annotation accepts: ``int | None`` -> ``integer or null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        names = [describe(a) for a in args]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        return "list"
    if origin is dict or dataclasses.is_dataclass(annotation):
        return "object"
    return _JSON_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def expect(value: Any, annotation: Any, field: str) -> Any:
    """``value`` checked against ``annotation`` (recursively); returns it converted where JSON cannot say it.

    JSON has no tuples (a list becomes one) and writes ``1.0`` as ``1`` (an
    integer is accepted as a number); ``true`` is never an integer.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return expect(value, option, field)
            except FieldError as exc:
                if exc.field != field:  # the right shape, wrong inside: that error is the useful one
                    raise
        raise _mismatch(value, annotation, field)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _mismatch(value, annotation, field)
    if origin is list:
        if not isinstance(value, list):
            raise _mismatch(value, annotation, field)
        return [expect(v, args[0], f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise FieldError(field, f"expected list of {len(args)}, got {_got(value)}")
        return tuple(expect(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _mismatch(value, annotation, field)
        return {k: expect(v, args[1], f"{field}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, field)
    if annotation is Any:
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _mismatch(value, annotation, field)
    if annotation is type(None) or annotation is None:
        if value is None:
            return None
        raise _mismatch(value, annotation, field)
    if isinstance(value, annotation) and not (isinstance(value, bool) and annotation is not bool):
        return value
    raise _mismatch(value, annotation, field)


def check_text(value: Any, field: str) -> None:
    """Refuse a string that is not Unicode text, naming the field (other values pass: their type is checked apart).

    JSON's ``\\ud800`` escape decodes to a lone surrogate, which no tokenizer takes and no UTF-8 file can
    hold: a prompt with one failed every run of it forever ("re-run to retry"). The data boundary checks
    its rows' text with this (:mod:`freelm.data`); records are left as read, for tools that grade them.
    """
    if not isinstance(value, str) or value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldError(
            field, f"not valid Unicode text: a lone surrogate {value[exc.start]!r} at character {exc.start}"
        ) from None


def build(cls: type[T], obj: Any, field: str = "") -> T:
    """An instance of dataclass ``cls`` from a decoded JSON object, every field checked.

    Missing required fields and unknown keys are errors naming the field: a
    record is written by one schema, so anything else is damage or a typo.
    """
    if not isinstance(obj, dict):
        raise _mismatch(obj, cls, field)
    hints, required, known = _schema(cls)
    prefix = f"{field}." if field else ""
    missing = [name for name in required if name not in obj]
    if missing:
        raise FieldError(field, f"missing field(s) {', '.join(missing)}")
    unknown = [key for key in obj if key not in known]
    if unknown:
        raise FieldError(f"{prefix}{unknown[0]}", f"unknown field (known: {', '.join(known)})")
    return cls(**{key: expect(value, hints[key], f"{prefix}{key}") for key, value in obj.items()})


@cache
def _schema(cls: type) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
    fields = [f for f in dataclasses.fields(cls) if f.init]
    hints = typing.get_type_hints(cls)
    required = tuple(
        f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    return {f.name: hints[f.name] for f in fields}, required, tuple(f.name for f in fields)


def _got(value: Any) -> str:
    text = repr(value)
    return f"{json_type(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def _mismatch(value: Any, annotation: Any, field: str) -> FieldError:
    return FieldError(field, f"expected {describe(annotation)}, got {_got(value)}")
