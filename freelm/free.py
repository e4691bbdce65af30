"""The free() operation: parse the Free-Module's deletion commands and apply them.

The Free-Module never rewrites text; it names spans to delete with two string
anchors. This module is the deterministic executor that turns those anchors into
character spans. It is pure Python with no dependencies so that the loop, the
training-data tools and the tests all share exactly one definition.

Semantics (see docs/free.md for worked examples):

* every command is resolved against the ORIGINAL text, never against the text
  left by an earlier command of the same round;
* ``prefix`` must occur exactly once (occurrences may overlap), else the command
  is skipped as ``prefix_not_found`` / ``prefix_ambiguous``;
* the span starts at the prefix and ends at the end of the first occurrence of
  ``suffix`` that starts at or after the end of the prefix (``suffix_not_found``
  otherwise); both anchors are deleted;
* empty anchors are skipped (``empty_anchor``);
* overlapping or touching spans are merged by default (the union of what the
  cleaner asked for); with ``overlap="skip"`` a span that overlaps an earlier
  accepted one (in command order) is skipped as ``overlap``.

Model output is untrusted: :func:`parse_commands` never raises.
"""

from __future__ import annotations

import json
import re
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Deletion",
    "Edit",
    "ParsedCommands",
    "SKIP_REASONS",
    "apply_deletions",
    "format_commands",
    "parse_commands",
    "remove_spans",
]

SKIP_REASONS = ("empty_anchor", "prefix_not_found", "prefix_ambiguous", "suffix_not_found", "overlap")

Span = tuple[int, int]


@dataclass(frozen=True)
class Deletion:
    """One command: delete from the unique ``prefix`` to the end of the next ``suffix``."""

    prefix: str
    suffix: str

    def to_dict(self) -> dict[str, str]:
        return {"prefix": self.prefix, "suffix": self.suffix}


class ParsedCommands(list):
    """A ``list[Deletion]`` that also says why parsing failed or what it dropped.

    ``error`` is set when nothing usable was found (the caller logs it and skips
    the round); ``dropped`` lists malformed items that were ignored while the
    valid ones were kept.
    """

    def __init__(self, items: Iterable[Deletion] = (), error: str | None = None, dropped: list[str] | None = None):
        super().__init__(items)
        self.error = error
        self.dropped: list[str] = dropped or []


@dataclass
class Edit:
    """Result of applying deletions: ``text`` is the original minus ``spans``.

    ``spans`` are disjoint, sorted ``(start, end)`` pairs in the ORIGINAL text's
    coordinates; ``applied`` are the commands that resolved; ``skipped`` pairs each
    rejected command with its reason (one of :data:`SKIP_REASONS`).
    """

    text: str
    spans: list[Span] = field(default_factory=list)
    applied: list[Deletion] = field(default_factory=list)
    skipped: list[tuple[Deletion, str]] = field(default_factory=list)

    @property
    def chars_deleted(self) -> int:
        return sum(end - start for start, end in self.spans)


# --------------------------------------------------------------------------- parsing

_THINK_CLOSE = "</think>"
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()

#: Deepest bracket nesting decoded (commands need 2). Deeper regions are skipped as ``nesting_too_deep``:
#: they are degenerate output, and Python's JSON decoder recurses once per level.
MAX_DEPTH = 32
#: Commands kept per round; each one scans the thinking, so the executor's cost is bounded by
#: ``MAX_COMMANDS x len(thinking)`` whatever the cleaner writes. The rest are dropped with a note.
MAX_COMMANDS = 256
#: Notes kept per round about malformed items; the rest are counted in one last note. Every note reaches the
#: rollout's record: a cleaner answering 10,000 bad items once wrote 10,000 notes into every round.
MAX_NOTES = 16

_CLOSER = {"[": "]", "{": "}"}
_OUTSIDE = re.compile(r"[\[{]")  # prose: only an opener matters
_IN_VALUE = re.compile(r'["\[\]{}]')
_IN_STRING = re.compile(r'["\\\x00-\x1f]')  # JSON strings end at '"'; a raw control character ends the value


@dataclass(frozen=True, slots=True)
class _Region:
    """A balanced ``[...]`` or ``{...}`` (JSON strings respected), at most :data:`MAX_DEPTH` levels tall."""

    start: int
    end: int
    opener: str
    parent: int | None  # start of the enclosing open bracket, None at top level


@dataclass
class _Scan:
    """One left-to-right pass over a candidate text: everything the decoding steps need."""

    regions: list[_Region]  # sorted by start
    open_list: int | None  # start of the outermost bracket still open at the end when it is a "["
    too_deep: bool


def _scan(text: str) -> _Scan:
    """Find every balanced bracket region in ONE pass (linear time, memory bounded by MAX_DEPTH).

    Brackets inside JSON strings do not count; a mismatched closer or a raw
    control character inside a string discards the open brackets (no JSON value
    spans it). Only the innermost MAX_DEPTH open brackets are kept, so a list
    after a run of unclosed ``[`` is still found; a region taller than that is
    skipped. The decoder later runs only on these regions, which is what keeps
    parsing linear: retrying it at every ``[`` was quadratic.
    """
    regions: list[_Region] = []
    stack: deque[tuple[int, str]] = deque()  # (start, opener) of the open brackets, innermost last
    lost = 0  # outer open brackets dropped to keep the stack at MAX_DEPTH: their regions are too deep
    too_deep = in_string = False
    pos = 0
    while True:
        pattern = _IN_STRING if in_string else (_IN_VALUE if stack or lost else _OUTSIDE)
        match = pattern.search(text, pos)
        if match is None:
            break
        ch, at, pos = match.group(), match.start(), match.end()
        if in_string:
            if ch == "\\":
                pos += 1
            else:
                in_string = False
                if ch != '"':
                    stack.clear()
                    lost = 0
        elif ch == '"':
            in_string = True
        elif ch in _CLOSER:
            if len(stack) == MAX_DEPTH:
                stack.popleft()
                lost += 1
            stack.append((at, ch))
        elif not stack:  # closes a dropped bracket
            lost -= 1
            too_deep = True
        else:
            start, opener = stack.pop()
            if _CLOSER[opener] == ch:
                regions.append(_Region(start, pos, opener, stack[-1][0] if stack else None))
            else:
                stack.clear()
                lost = 0
    regions.sort(key=lambda r: r.start)
    open_list = stack[0][0] if stack and not lost and stack[0][1] == "[" else None
    return _Scan(regions, open_list, too_deep)


def _first_value(text: str, scan: _Scan, opener: str) -> list | dict | None:
    """The first region (by start) of kind ``opener`` that decodes; linear in ``len(text)``.

    A region that fails to decode at position ``q`` makes every region
    containing ``q`` fail the same way (JSON's grammar is the same at every
    level), so those are skipped; each decoder call then scans text no earlier
    call scanned. A region that starts AT ``q`` is not among them: the bracket
    its enclosing value did not expect there is where this value begins.
    """
    failed_at = -1
    for region in scan.regions:
        if region.opener != opener or region.start < failed_at < region.end:
            continue
        try:  # a slice, not raw_decode(text, start): JSONDecodeError counts the lines before its position
            return _DECODER.decode(text[region.start : region.end])
        except json.JSONDecodeError as exc:
            failed_at = region.start + exc.pos
        except (ValueError, RecursionError):  # e.g. an integer beyond Python's digit limit
            failed_at = region.end - 1
    return None


def _recovered_objects(text: str, scan: _Scan) -> list:
    """Complete ``{...}`` items of a list whose closing bracket never came (the cleaner hit its limit)."""
    found = []
    for region in scan.regions:
        if region.parent == scan.open_list and region.opener == "{":
            try:
                found.append(_DECODER.decode(text[region.start : region.end]))
            except (ValueError, RecursionError):
                break
    return found


def parse_commands(raw: str) -> ParsedCommands:
    """Extract deletion commands from a cleaner's raw output.

    Accepts a bare JSON list, a list inside a code fence, a list with prose
    around it, a ``<think>...</think>`` block before it (only the text after the
    last ``</think>`` is read), a single ``{"prefix", "suffix"}`` object, and a
    list cut off mid-way (the complete objects before the cut are recovered, as
    happens when the cleaner hits its token limit). ``[]`` is a valid "delete
    nothing". Never raises, and runs in time linear in ``len(raw)`` whatever it
    holds: brackets nested beyond :data:`MAX_DEPTH` are skipped, noted as
    ``nesting_too_deep`` in ``dropped`` (or as the ``error`` when nothing else
    decodes), and commands beyond :data:`MAX_COMMANDS` are dropped with a note.
    """
    if not isinstance(raw, str):
        return ParsedCommands(error=f"not_text: {type(raw).__name__}")
    text = raw.rsplit(_THINK_CLOSE, 1)[-1] if _THINK_CLOSE in raw else raw
    text = text.strip()
    if not text:
        return ParsedCommands(error="empty_output")

    candidates = [m.group(1).strip() for m in _FENCE.finditer(text)] + [text]
    scans = [(candidate, _scan(candidate)) for candidate in candidates]
    for candidate, scan in scans:
        value = _first_value(candidate, scan, "[")
        if value is not None:
            return _commands_from_value(value, note="nesting_too_deep" if scan.too_deep else None)
    if scans[-1][1].open_list is not None:
        recovered = _recovered_objects(text, scans[-1][1])
        if recovered:
            return _commands_from_value(recovered, note="truncated_list_recovered")
    for candidate, scan in scans:
        value = _first_value(candidate, scan, "{")
        if value is not None:
            return _commands_from_value(value, note="nesting_too_deep" if scan.too_deep else None)
    too_deep = any(scan.too_deep for _, scan in scans)
    return ParsedCommands(error="nesting_too_deep" if too_deep else "no_json_list")


def _commands_from_value(value, note: str | None = None) -> ParsedCommands:
    if isinstance(value, dict):
        value = [value]
    commands, dropped = [], []
    unnoted: Counter[str] = Counter()  # reasons of the malformed items past MAX_NOTES
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            reason = "not an object"
        elif not isinstance(item.get("prefix"), str) or not isinstance(item.get("suffix"), str):
            reason = "needs string 'prefix' and 'suffix'"
        else:
            commands.append(Deletion(item["prefix"], item["suffix"]))
            continue
        if len(dropped) < MAX_NOTES:
            dropped.append(f"item {i}: {reason}")
        else:
            unnoted[reason] += 1
    if unnoted:
        counts = ", ".join(f"{reason}: {n}" for reason, n in unnoted.items())
        dropped.append(f"{unnoted.total()} more items dropped ({counts})")
    if len(commands) > MAX_COMMANDS:
        dropped.append(f"too_many_commands: kept the first {MAX_COMMANDS} of {len(commands)}")
        commands = commands[:MAX_COMMANDS]
    if note:
        dropped.insert(0, note)
    return ParsedCommands(commands, dropped=dropped)


def format_commands(deletions: Iterable[Deletion]) -> str:
    """The canonical JSON the Free-Module is trained to write (one source of truth)."""
    return json.dumps([d.to_dict() for d in deletions], ensure_ascii=False)


# --------------------------------------------------------------------------- applying


def _resolve(text: str, d: Deletion) -> Span | str:
    if not d.prefix or not d.suffix:
        return "empty_anchor"
    start = text.find(d.prefix)
    if start < 0:
        return "prefix_not_found"
    if text.find(d.prefix, start + 1) >= 0:
        return "prefix_ambiguous"
    suffix_at = text.find(d.suffix, start + len(d.prefix))
    if suffix_at < 0:
        return "suffix_not_found"
    return (start, suffix_at + len(d.suffix))


def apply_deletions(text: str, deletions: Iterable[Deletion], overlap: Literal["merge", "skip"] = "merge") -> Edit:
    """Delete every resolvable command's span from ``text``.

    ``text`` must be the editable region only (the thinking so far): the caller
    keeps the problem statement and chat template out of reach. Cost is linear in
    ``len(text)`` per command.
    """
    if overlap not in ("merge", "skip"):
        raise ValueError(f"overlap must be 'merge' or 'skip', got {overlap!r}")
    resolved: list[tuple[Span, Deletion]] = []
    skipped: list[tuple[Deletion, str]] = []
    for d in deletions:
        span = _resolve(text, d)
        if isinstance(span, str):
            skipped.append((d, span))
        elif overlap == "skip" and any(span[0] < e and s < span[1] for (s, e), _ in resolved):
            skipped.append((d, "overlap"))
        else:
            resolved.append((span, d))
    edit = remove_spans(text, [span for span, _ in resolved])
    edit.applied = [d for _, d in resolved]
    edit.skipped = skipped
    return edit


def remove_spans(text: str, spans: Iterable[Span]) -> Edit:
    """Remove character spans (merging overlapping or touching ones).

    The shared tail of :func:`apply_deletions` and of cleaners that pick spans
    directly (e.g. the head-and-tail truncation baseline).
    """
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if not 0 <= start <= end <= len(text):
            raise ValueError(f"span ({start}, {end}) outside text of length {len(text)}")
        if start == end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces, pos = [], 0
    for start, end in merged:
        pieces.append(text[pos:start])
        pos = end
    pieces.append(text[pos:])
    return Edit(text="".join(pieces), spans=[(s, e) for s, e in merged])
