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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from freelm.free import remove_spans
from freelm.jsonl import iter_jsonl
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

#: Characters of a cleaner's raw answer kept in its round (a Free-Module answer of the default 1,024 tokens is
#: a few KB); past it the text is cut and marked. With the parser's caps (``free.MAX_NOTES`` notes,
#: ``free.MAX_COMMANDS`` skipped commands, each anchor cut at :data:`MAX_ANCHOR_CHARS`) a round stays a few
#: tens of KB whatever the cleaner answers: one answering 10,000 commands per call once made 4-20 MB rollouts.
MAX_RAW_OUTPUT_CHARS = 8_192
#: Characters of a skipped command's prefix or suffix kept in its round.
MAX_ANCHOR_CHARS = 64


def clip(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters marked with how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}[... {len(text) - limit:,} more characters not stored]"


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
    # How this call resumed after the previous round's cleaning (docs/free.md, "Resuming after a deletion"):
    evicted_tokens: int = 0  # KV entries of deleted tokens the engine removed in place (an eviction strategy)
    rerotated_tokens: int = 0  # kept entries whose keys the engine re-rotated to a new position
    reprefilled_tokens: int | None = None  # tokens computed before and computed again (None: cache not reported)

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
