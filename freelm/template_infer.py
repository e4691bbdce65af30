"""``freelm template infer``: recover a Free-Module's cleaning prompt from its SFT rows.

The released Free-Modules were trained on prompts that only their SFT data shows
(rows ``{"prompt", "completion"}``, every prompt one template rendered with a
problem and a reasoning text). To run such an adapter with the prompt it knows,
the template is recovered here and written as a ``--clean-template`` file.

How: the constant text before the first slot is the longest common prefix of
all prompts, the text after the last slot the longest common suffix, and the
text between the two slots the longest string every remaining middle contains
(a sliding window over the shortest middle). Which slot is ``{thinking}`` is read from the completions: the
spans a completion deletes are quoted from the thinking, so its ``prefix`` /
``suffix`` anchors occur in that slot (the longer slot decides when no row has
an anchor). The limits of the method: text every row's problem (or thinking)
happens to start or end with is indistinguishable from template text, so use
rows with varied problems; the result is printed for a look.

Rows disagree, and nothing is written, when the middle constant is missing
from some row, when rows put the thinking in different slots, or when the
first and second half of the file give different templates (two templates
concatenated).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freelm.free import parse_commands
from freelm.jsonl import iter_jsonl
from freelm.prompts import fill_template

_SLOTS = ("{problem}", "{thinking}")


class TemplateMismatch(ValueError):
    """The rows do not come from one template (or carry too little to tell it)."""


@dataclass
class InferredTemplate:
    """The recovered template and what the rows say about it."""

    template: str
    rows: int
    explained: int  # rows the template reproduces exactly with their own slot values
    thinking_first: bool
    completion_formats: Counter = field(default_factory=Counter)  # bare_json, fenced, think_block, other
    unparsed: int = 0  # completions parse_commands cannot read
    unparsed_examples: list[str] = field(default_factory=list)

    def report(self) -> str:
        order = "{thinking} before {problem}" if self.thinking_first else "{problem} before {thinking}"
        formats = ", ".join(f"{k} {v}" for k, v in self.completion_formats.most_common())
        lines = [
            f"template explains {self.explained}/{self.rows} rows exactly ({order})",
            f"completion formats: {formats}",
            f"parse_commands reads {self.rows - self.unparsed}/{self.rows} completions",
        ]
        lines += [f"  unreadable: {example!r}" for example in self.unparsed_examples]
        return "\n".join(lines)


def _common_prefix(texts: list[str]) -> str:
    return os.path.commonprefix(texts)


def _common_suffix(texts: list[str]) -> str:
    return os.path.commonprefix([t[::-1] for t in texts])[::-1]


def _middle_constant(middles: list[str], sample: int = 64) -> str:
    """The longest string in every middle (a sliding window over the shortest middle).

    "``a[i:j]`` is in every middle" holds for every window inside a window where it holds, so one
    pass that grows ``j`` and advances ``i`` finds the longest such window with O(len) membership tests.
    The tests run on ``sample`` middles; the caller's row check covers all.
    """
    a = min(middles, key=len)
    pool = sorted(middles, key=len)[:sample]
    best, j = "", 0
    for i in range(len(a)):
        j = max(j, i)
        while j < len(a) and all(a[i : j + 1] in m for m in pool):
            j += 1
        if j - i > len(best):
            best = a[i:j]
    if not best or not all(best in m for m in middles):
        raise TemplateMismatch("no text between the two slots is common to all rows: rows disagree on the template")
    return best


def _holds_anchors(text: str, completion: str) -> bool:
    """Every span the completion deletes is quoted from ``text`` (False when it deletes nothing)."""
    commands = parse_commands(completion)
    return bool(commands) and all(d.prefix in text and d.suffix in text for d in commands)


def _split(prompts: list[str], completions: list[str]) -> tuple[str, str, str, bool]:
    """(before, between, after, thinking_first) of one template explaining all ``prompts``."""
    if len(prompts) < 2:
        raise TemplateMismatch("need at least 2 rows to tell template text from slot text")
    before = _common_prefix(prompts)
    rest = [p[len(before) :] for p in prompts]
    after = _common_suffix(rest)
    middles = [r[: len(r) - len(after)] if after else r for r in rest]
    between = _middle_constant(middles)
    votes = Counter()
    for middle, completion in zip(middles, completions):
        first, _, second = middle.partition(between)
        in_first, in_second = _holds_anchors(first, completion), _holds_anchors(second, completion)
        if in_first != in_second:
            votes["first" if in_first else "second"] += 1
    if len(votes) > 1:
        raise TemplateMismatch(
            f"rows disagree on the slot order: the deleted spans are in the first slot in {votes['first']} "
            f"rows and in the second in {votes['second']}"
        )
    if votes:
        thinking_first = "first" in votes
    else:  # no anchors anywhere (e.g. every completion is []): the thinking is the longer slot
        lengths = [(len(m.partition(between)[0]), len(m.partition(between)[2])) for m in middles]
        thinking_first = sum(a for a, _ in lengths) > sum(b for _, b in lengths)
    return before, between, after, thinking_first


def _render(before: str, between: str, after: str, thinking_first: bool) -> str:
    first, second = (_SLOTS[1], _SLOTS[0]) if thinking_first else _SLOTS
    return f"{before}{first}{between}{second}{after}"


def _completion_format(completion: str) -> str:
    text = completion.strip()
    if "</think>" in text:
        return "think_block"
    if text.startswith("```"):
        return "fenced"
    if text.startswith("[") or text.startswith("{"):
        return "bare_json"
    return "other"


def infer_template(rows: list[dict[str, Any]]) -> InferredTemplate:
    """The template behind ``rows`` (each with string ``prompt`` and ``completion``); raises TemplateMismatch."""
    prompts = [r["prompt"] for r in rows]
    completions = [r["completion"] for r in rows]
    parts = _split(prompts, completions)
    if len(rows) >= 4:
        half = len(rows) // 2
        halves = [
            _render(*_split(prompts[:half], completions[:half])),
            _render(*_split(prompts[half:], completions[half:])),
        ]
        if halves[0] != halves[1]:
            raise TemplateMismatch(
                f"rows disagree: rows 1-{half} and rows {half + 1}-{len(rows)} give different templates "
                f"(first differs at character {len(os.path.commonprefix(halves))})"
            )
    before, between, after, thinking_first = parts
    template = _render(*parts)
    explained = 0
    for prompt in prompts:
        middle = prompt[len(before) : len(prompt) - len(after)]
        first, sep, second = (middle.rpartition if thinking_first else middle.partition)(between)
        problem, thinking = (second, first) if thinking_first else (first, second)
        # rendered by the loop's own substitution, so "explained" means the runner would send this prompt
        explained += bool(sep and first and second) and fill_template(template, problem, thinking) == prompt
    unparsed = [c for c in completions if parse_commands(c).error is not None]
    return InferredTemplate(
        template=template,
        rows=len(rows),
        explained=explained,
        thinking_first=thinking_first,
        completion_formats=Counter(_completion_format(c) for c in completions),
        unparsed=len(unparsed),
        unparsed_examples=[c[:80] for c in unparsed[:3]],
    )


def load_sft_rows(source: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows from a local JSONL file, or else a Hugging Face dataset name (downloaded: never in tests)."""
    path = Path(source)
    if path.exists() or path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise ValueError(f"{path}: SFT file not found")
        rows = []
        for number, row in iter_jsonl(path):
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{number}: row needs a string {key!r}")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
        return rows
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"{source}: not a file, and reading a Hub dataset needs `pip install datasets`") from exc
    dataset = datasets.load_dataset(source, split="train")
    if not {"prompt", "completion"} <= set(dataset.column_names):
        raise ValueError(f"{source}: rows need 'prompt' and 'completion' columns, found {dataset.column_names}")
    n = len(dataset) if not limit else min(limit, len(dataset))
    return [{"prompt": dataset[i]["prompt"], "completion": dataset[i]["completion"]} for i in range(n)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sft", required=True, metavar="FILE_OR_HUB_NAME", help="SFT rows {prompt, completion}")
    parser.add_argument("-o", "--output", type=Path, required=True, help="write the template here")
    parser.add_argument("--limit", type=int, default=2000, help="read at most this many rows (0: all)")


def run(args: argparse.Namespace) -> int:
    try:
        rows = load_sft_rows(args.sft, args.limit or None)
        inferred = infer_template(rows)
    except ValueError as exc:  # TemplateMismatch included: nothing is written
        print(f"error: {args.sft}: {exc}", file=sys.stderr)
        return 2
    print(inferred.report())
    if inferred.explained < inferred.rows:
        print(f"error: the template explains only {inferred.explained}/{inferred.rows} rows", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(inferred.template, encoding="utf-8")
    print(f"wrote {args.output} ({len(inferred.template)} chars); run with --clean-template {args.output}")
    return 0
