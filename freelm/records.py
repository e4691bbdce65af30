"""Records that cross module boundaries: one schema, written by the runner, read by evaluation.

Data flows one way: ``loop`` produces a :class:`RolloutResult` (with one
:class:`RoundRecord` per reasoning call), ``runner`` wraps it with the problem's
identity into a :class:`RolloutRecord` and appends it as one JSONL line, and
``evaluation`` / the trace viewer read those lines back with :func:`read_rollouts`.

A rollout's history is replayable from its rounds: the thinking text before
round *r*'s cleaning is the thinking after round *r-1*'s cleaning plus round
*r*'s ``generated_text`` (less ``rewound_chars``, almost always 0); ``clean.deleted_spans`` are in that text's coordinates
(see :meth:`RolloutRecord.replay`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TextIO

from freelm.free import remove_spans
from freelm.validation import build

SCHEMA_VERSION = 1


def _plain(value: Any) -> Any:
    """``dataclasses.asdict`` without its deep copy of every leaf (1 ms per 8-round record, in the writer).

    Records hold only immutable leaves (str, int, float, None), so rebuilding
    the containers is the whole copy.
    """
    if hasattr(type(value), "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


RolloutFinish = Literal["stop", "length", "context_overflow", "error"]


@dataclass
class CleanRecord:
    """One cleaning round (Free-Module call + executor)."""

    cleaner: str
    context_tokens_before: int
    context_tokens_after: int
    deleted_spans: list[tuple[int, int]] = field(default_factory=list)
    chars_deleted: int = 0
    tokens_deleted: int = 0
    applied: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"prefix", "suffix", "reason"}
    parse_error: str | None = None
    dropped: list[str] = field(default_factory=list)
    raw_output: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    latency_s: float = 0.0
    error: str | None = None
    max_new_tokens: int | None = None  # the answer budget the call was sent with (capped to the window)
    no_room: str | None = None  # set when no call was sent: the prompt left no room in the cleaner's window
    endpoint: str | None = None  # the server that answered (None: no call, an in-process cleaner, an old record)


@dataclass
class RoundRecord:
    """One reasoning call, and the cleaning that followed it (if any)."""

    index: int
    generated_text: str
    generated_tokens: int
    prompt_tokens: int  # context sent to the reasoner
    context_tokens: int  # context after this call, before cleaning
    reused_tokens: int  # prompt tokens equal to the previous reasoning request's prefix
    cached_tokens: int | None  # as reported by the server (None: not reported)
    finish_reason: str
    latency_s: float
    clean: CleanRecord | None = None
    rewound_chars: int = 0  # trailing chars of the previous text redecoded (a split multi-byte character)
    endpoint: str | None = None  # the server that answered (None: not known, or a record older than the field)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        """Every field type-checked (:func:`freelm.validation.build`); raises ``FieldError`` naming the field."""
        return build(cls, d)


@dataclass
class RolloutResult:
    """Everything one rollout of the loop produced."""

    response: str  # the final kept text after the prompt: pruned thinking, "</think>", answer
    finish_reason: RolloutFinish
    prompt_tokens: int  # the reasoning prompt (chat template + problem)
    generated_tokens: int  # every token the reasoner generated, deleted or not
    final_context_tokens: int  # prompt + kept response at the end (kept response = this - prompt_tokens)
    peak_context_tokens: int  # largest prompt + response the reasoner ever held
    rounds: list[RoundRecord] = field(default_factory=list)
    wall_time_s: float = 0.0
    error: str | None = None

    @property
    def cleaning_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.clean is not None and r.clean.no_room is None)

    @property
    def reasoning_time_s(self) -> float:
        return sum(r.latency_s for r in self.rounds)

    @property
    def cleaning_time_s(self) -> float:
        return sum(r.clean.latency_s for r in self.rounds if r.clean is not None)


@dataclass
class RolloutRecord:
    """One line of the runner's output JSONL: problem identity + rollout result."""

    id: str
    source: str
    rollout: int
    seed: int
    answer: str | None
    mode: str  # "freelm", "vanilla", or a baseline cleaner's name
    config_hash: str
    response: str
    finish_reason: RolloutFinish
    prompt_tokens: int
    generated_tokens: int
    final_context_tokens: int
    peak_context_tokens: int
    cleaning_rounds: int
    wall_time_s: float
    reasoning_time_s: float
    cleaning_time_s: float
    rounds: list[RoundRecord] = field(default_factory=list)
    prompt: str | None = None
    error: str | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_result(
        cls,
        result: RolloutResult,
        *,
        id: str,
        source: str,
        rollout: int,
        seed: int,
        answer: str | None,
        mode: str,
        config_hash: str,
        prompt: str | None = None,
    ) -> RolloutRecord:
        """The result's every field and derived total, with the problem's identity around them."""
        carried = {f.name: getattr(result, f.name) for f in fields(result)}
        return cls(
            id=id,
            source=source,
            rollout=rollout,
            seed=seed,
            answer=answer,
            mode=mode,
            config_hash=config_hash,
            cleaning_rounds=result.cleaning_rounds,
            reasoning_time_s=result.reasoning_time_s,
            cleaning_time_s=result.cleaning_time_s,
            prompt=prompt,
            **carried,
        )

    @property
    def key(self) -> tuple[str, str, int]:
        """Unique per run: ids repeat across benchmarks (AIME25 and BeyondAIME both have id 1)."""
        return (self.source, self.id, self.rollout)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutRecord:
        """Every field (rounds and their cleaning included) type-checked; raises ``FieldError`` naming the field."""
        return build(cls, d)

    def replay(self) -> Iterator[tuple[RoundRecord, str]]:
        """Yield ``(round, thinking_before_cleaning)`` for every round, in order.

        The recorded spans are removed by the executor's own :func:`~freelm.free.remove_spans`,
        so the replayed text is the one the loop resumed on; a span outside its
        round's text (a corrupt record) raises ``ValueError`` naming the rollout and round.
        """
        thinking = ""
        for number, rnd in enumerate(self.rounds):
            thinking = thinking[: len(thinking) - rnd.rewound_chars] + rnd.generated_text
            yield rnd, thinking
            if rnd.clean is not None:
                try:
                    thinking = remove_spans(thinking, rnd.clean.deleted_spans).text
                except ValueError as exc:
                    raise ValueError(f"rollout {self.key}: round {number}: {exc}") from None


# --------------------------------------------------------------------------- JSONL I/O


def append_jsonl(handle, obj: dict[str, Any]) -> None:
    """Append one line and push it to disk: a kill can lose only what is in flight."""
    append_jsonl_lines(handle, [obj])


def append_jsonl_lines(handle, objs: Iterable[dict[str, Any]]) -> None:
    """Append lines and push them to disk with ONE fsync (about 5 ms on a busy disk: per line, a burst of
    finished rollouts queued behind it); a kill before it returns loses lines still in flight, and a torn
    last line is repaired on resume (:func:`repair_torn_tail`)."""
    handle.write("".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in objs))
    handle.flush()
    os.fsync(handle.fileno())


@contextmanager
def unique_temp(path: Path) -> Iterator[tuple[TextIO, Path]]:
    """A temp file beside ``path`` that no other writer shares (random + pid suffix), fsynced when the block ends.

    Two writers of one file must never rename each other's half-written temp
    file. On error the temp file is removed and the error re-raised.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=f".{os.getpid()}.tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write a whole file through a temp file and a rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    with unique_temp(path) as (f, tmp):
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def iter_jsonl(path: str | Path, *, tolerate_torn_tail: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)``; a torn LAST line (a writer killed mid-line) is dropped.

    Any other unparseable line is an error naming the file and line.
    """
    path = Path(path)
    with path.open("rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            if tolerate_torn_tail and torn_tail and number == len(lines):
                return
            raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def repair_torn_tail(path: str | Path) -> int:
    """Make a killed writer's file appendable again; returns the bytes removed.

    A last line without its newline is truncated when it is not valid JSON, and
    completed with the newline when it is: :func:`iter_jsonl` yields such a line,
    so a reader that saw it (e.g. a resume deciding what is done) must keep it.
    """
    path = Path(path)
    if not path.exists():
        return 0
    with path.open("rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
        except ValueError:
            f.truncate(cut)
            return len(data) - cut
        f.write(b"\n")
        return 0


def read_rollouts(path: str | Path) -> list[RolloutRecord]:
    """Read a runner output file; a bad record is ``file:line: field: expected X, got Y``."""
    return rollouts_from_rows(iter_jsonl(path), path)


def rollouts_from_rows(rows: Iterable[tuple[int, dict[str, Any]]], path: str | Path) -> list[RolloutRecord]:
    """Records from ``(line_number, object)`` rows already read from ``path`` (named in errors)."""
    records = []
    for number, obj in rows:
        try:
            records.append(RolloutRecord.from_dict(obj))
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from exc
    return records
