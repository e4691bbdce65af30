"""The Free-Module's SFT rows: build them, read them back, and check them (``freelm data check``).

A row is the upstream training format, ``{"prompt": ..., "completion": ...}``,
plus metadata. The prompt is the cleaning prompt rendered by
:func:`freelm.prompts.render_cleaning_prompt` (the SAME function the loop calls at
inference), the completion is :func:`freelm.free.format_commands` of the
deletions followed by the end-of-turn token, so the model learns to stop.

The check re-derives the thinking from each prompt and runs the project's
executor on it: a command whose prefix is missing or ambiguous would be a silent
no-op at inference, so training on it teaches the adapter to waste its call.
The bare problem text is stored in every row (``problem``) so that recovery is
exact; rows without it are split by the template alone and rejected when that
split is ambiguous.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freelm.free import Deletion, apply_deletions, format_commands, parse_commands
from freelm.jsonl import iter_jsonl
from freelm.prompts import recover_thinking, render_cleaning_prompt

#: Qwen3's end-of-turn token: the completion ends with it so the adapter stops after the list.
END_OF_TURN = "<|im_end|>"


def build_row(
    problem: str,
    thinking: str,
    deletions: Iterable[Deletion],
    *,
    template: str | Path | None = None,
    end_of_turn: str = END_OF_TURN,
    **metadata: Any,
) -> dict[str, Any]:
    """One SFT row; ``metadata`` (id, cut position, accuracies, ...) rides along untouched."""
    return {
        "prompt": render_cleaning_prompt(problem, thinking, template),
        "completion": format_commands(deletions) + end_of_turn,
        "problem": problem,
        **metadata,
    }


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` pairs with string ``prompt`` and ``completion``; anything else names its file and line."""
    rows = []
    for number, row in iter_jsonl(path, tolerate_torn_tail=False):
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{path}:{number}: field {key!r} must be a string, got {type(row.get(key)).__name__}")
        rows.append((number, row))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------- check


@dataclass
class CheckReport:
    """What ``freelm data check`` found; ``errors`` and ``warnings`` are ``file:line: message`` strings."""

    path: str
    rows: int = 0
    empty: int = 0  # "[]" completions: nothing to delete
    commands: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    too_long: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.rows} rows, {self.commands} commands, {self.empty} empty ([]) completions",
            f"errors: {len(self.errors)}, warnings: {len(self.warnings)}",
        ]
        for name, values in (("prompt", self.prompt_tokens), ("completion", self.completion_tokens)):
            if values:
                stats = ", ".join(f"p{q}={percentile(values, q)}" for q in (50, 90, 99))
                lines.append(f"{name} tokens: min={min(values)}, {stats}, max={max(values)}")
        if self.too_long:
            lines.append(f"rows over max length (the trainer drops them): {self.too_long}")
        return "\n".join(lines)


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile: always one of the observed values."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def check_row(row: dict[str, Any], template: str | Path | None, end_of_turn: str) -> tuple[int, list[str], list[str]]:
    """``(number of commands, errors, warnings)`` of one row whose prompt/completion are strings."""
    errors, warnings = [], []
    completion = row["completion"]
    if not completion.endswith(end_of_turn):
        errors.append(f"completion does not end with the end-of-turn token {end_of_turn!r}")
    body = completion.removesuffix(end_of_turn)
    commands = parse_commands(body)
    if commands.error:
        errors.append(f"completion is not a JSON list of deletions ({commands.error})")
        return 0, errors, warnings
    errors += [f"completion: {note}" for note in commands.dropped]
    if not commands.dropped and format_commands(commands) != body:
        warnings.append("completion is valid but not in the canonical format_commands() form")
    problem = row.get("problem")
    try:
        thinking = recover_thinking(row["prompt"], template, problem if isinstance(problem, str) else None)
    except ValueError as exc:
        errors.append(str(exc))
        return len(commands), errors, warnings
    edit = apply_deletions(thinking, commands)
    for deletion, reason in edit.skipped:
        errors.append(f"command {deletion.to_dict()} does not resolve against its thinking: {reason}")
    return len(commands), errors, warnings


def check_file(
    path: str | Path,
    tokenizer: Any | None = None,
    template: str | Path | None = None,
    end_of_turn: str = END_OF_TURN,
    max_length: int | None = None,
) -> CheckReport:
    """Check every row; token statistics need a :class:`freelm.tokenizer.Tokenizer`."""
    report = CheckReport(path=str(path))
    try:
        rows = read_rows(path)
    except (OSError, ValueError) as exc:
        report.errors.append(str(exc))
        return report
    for number, row in rows:
        report.rows += 1
        n_commands, errors, warnings = check_row(row, template, end_of_turn)
        report.commands += n_commands
        report.empty += n_commands == 0 and not errors
        report.errors += [f"{path}:{number}: {e}" for e in errors]
        report.warnings += [f"{path}:{number}: {w}" for w in warnings]
        if tokenizer is not None:
            prompt_len = len(tokenizer.encode(row["prompt"]))
            completion_len = len(tokenizer.encode(row["completion"]))
            report.prompt_tokens.append(prompt_len)
            report.completion_tokens.append(completion_len)
            report.too_long += max_length is not None and prompt_len + completion_len > max_length
    return report


# --------------------------------------------------------------------------- CLI: freelm data check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="SFT JSONL with prompt/completion rows")
    parser.add_argument("--tokenizer", help="tokenizer directory, for token-length percentiles")
    parser.add_argument("--template", help="cleaning template the prompts were rendered with (default: built-in)")
    parser.add_argument("--end-of-turn", default=END_OF_TURN, help="token every completion must end with")
    parser.add_argument("--max-length", type=int, help="count rows whose prompt+completion tokens exceed this")
    parser.add_argument("--show", type=int, default=20, help="print at most this many errors and warnings each")


def run(args: argparse.Namespace) -> int:
    tokenizer = None
    if args.tokenizer:
        from freelm.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    report = check_file(args.file, tokenizer, args.template, args.end_of_turn, args.max_length)
    print(report.summary())
    for kind, messages in (("error", report.errors), ("warning", report.warnings)):
        for message in messages[: args.show]:
            print(f"{kind}: {message}")
        if len(messages) > args.show:
            print(f"... and {len(messages) - args.show} more {kind}s")
    return 0 if report.ok else 1
