"""The cleaning-outcome rule: what a Free()LM run's cleaning rounds produced, and when the run is flagged.

A cleaning round that deletes nothing costs the rollout nothing but context, so
a Free()LM run whose cleaner is wrong (a template the adapter was not trained
on, an adapter name the server does not serve, a window too small for the
cleaning prompt) used to finish "complete", exit 0, and be a vanilla run at
several times the cost. This module is the one place that counts what every
cleaning round produced (:class:`CleaningTally`) and decides whether that is a
Free()LM run at all (:class:`CleaningRule`); the runner prints the tally, stores
it in the manifest and, for a flagged run, exits :data:`EXIT_CLEANING` with
:func:`flag_message`. One rule for every backend and every failure: calls that
failed and answers that were no usable deletion list count alike.

A round is exactly one of :data:`OUTCOMES`; ``applied`` and
``nothing_to_delete`` (a valid ``[]``) are usable, the rest are not. The rule
judges what the output holds (every rollout of the run, this invocation's and
earlier ones'), so a resumed run that adds no rollout still reports a cleaner
that never worked.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freelm.backends.base import says_window_exceeded
from freelm.prompts import DEFAULT_CLEAN_TEMPLATE
from freelm.records import RoundRecord

#: The runner's exit code for a flagged run: distinct from 1 (re-run to retry) and 2 (bad input), because
#: re-running the same command resumes with the same cleaner and adds nothing.
EXIT_CLEANING = 3

#: What one cleaning round can have produced; the first two are usable.
OUTCOMES = ("applied", "nothing_to_delete", "unresolved", "parse_error", "failed", "no_room")

#: The default limit on unusable rounds. The embedded default at the demo's settings has 1.5% (8 of 536
#: rounds at limit 216 whose one command named a span not in the thinking, no parse error, no failure;
#: docs/runner.md "Cleaning outcomes"), so a healthy run passes with a 3x margin; a mismatched template
#: or an unserved adapter gives 50-100%.
DEFAULT_MAX_UNUSABLE = 0.05

_Z95 = 1.959964  # the normal quantile of a two-sided 95% interval

_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")
#: How servers say an adapter (or model) name is not served: SGLang ``managers/tokenizer_manager.py``
#: ("LoRA adapter that has never been loaded"), vLLM / OpenAI ("The model `x` does not exist"), the
#: in-process engine (``freelm/backends/local.py``: "adapter 'x' is not loaded").
_UNKNOWN_ADAPTER = ("never been loaded", "does not exist", "is not loaded", "unknown model", "no such model")


def failure_reason(error: str) -> str:
    """A failed call's reason from its recorded error text (old records included): one short word.

    ``context`` (the window refused it), ``timeout``, ``connection`` (refused,
    reset, no healthy endpoint), ``unknown_adapter`` (a 404, or a 4xx saying the
    adapter or model is not served), ``server_error`` (5xx), ``http_NNN`` (another
    4xx), ``malformed_reply`` (the server answered something unreadable), else
    ``other`` (a cleaner's own exception).
    """
    text = error.lower()
    status = _HTTP_STATUS.findall(error)
    code = int(status[-1]) if status else None
    if says_window_exceeded(error):
        return "context"
    client = code is None or 400 <= code < 500
    if code == 404 or (client and any(marker in text for marker in _UNKNOWN_ADAPTER)):
        return "unknown_adapter"
    if code is not None and 400 <= code < 500:
        return f"http_{code}"
    if "timeout" in text or "timed out" in text or "hung" in text:
        return "timeout"
    if code is not None and code >= 500:
        return "server_error"
    if "connection" in text or "no healthy endpoint" in text:
        return "connection"
    if "malformed" in text or "not json" in text or "no choices" in text:
        return "malformed_reply"
    return "other"


def round_outcome(clean: Any) -> tuple[str, str | None]:
    """``(outcome, kind)`` of one round's :class:`~freelm.records.CleanRecord`; ``kind`` details the unusable ones."""
    if clean.no_room is not None:
        return "no_room", None
    if clean.error is not None:
        return "failed", failure_reason(clean.error)
    if clean.parse_error is not None:
        return "parse_error", clean.parse_error.split(":", 1)[0]
    if clean.applied:
        return "applied", None
    if clean.skipped:
        return "unresolved", None  # a list whose every command the executor rejected
    return "nothing_to_delete", None


@dataclass
class CleaningTally:
    """Counts of cleaning rounds by outcome, parse errors by kind, failed calls by reason, and one example each.

    ``examples`` maps an unusable reason (``parse_error:no_json_list``,
    ``failed:unknown_adapter``, ``unresolved``, ``no_room``) to the first round
    seen with it: source, id, rollout, round and what it said (truncated).
    """

    rounds: int = 0
    applied: int = 0
    nothing_to_delete: int = 0
    unresolved: int = 0
    no_room: int = 0
    skipped_commands: int = 0  # commands the executor rejected, in any round
    parse_errors: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        """Cleaning calls sent (a no-room round sends none)."""
        return self.rounds - self.no_room

    @property
    def usable(self) -> int:
        return self.applied + self.nothing_to_delete

    @property
    def unusable(self) -> int:
        return self.rounds - self.usable

    @property
    def unusable_fraction(self) -> float:
        return self.unusable / self.rounds if self.rounds else 0.0

    @property
    def unusable_lower_bound(self) -> float:
        """The lower end of the 95% Wilson interval of the unusable fraction: what the rule compares.

        A healthy cleaner's few unusable rounds must not flag a small run (2 of 27
        rounds is 7.4%, but its lower bound is 2.1%), while a cleaner that never
        works is flagged after a handful (4 of 4: 51%).
        """
        n = self.rounds
        if not n:
            return 0.0
        p, z2 = self.unusable / n, _Z95**2
        centre = p + z2 / (2 * n)
        margin = _Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
        return max(0.0, (centre - margin) / (1 + z2 / n))

    def reasons(self) -> dict[str, int]:
        """Every unusable reason with its count, largest first."""
        counts = {
            **{f"parse_error:{k}": v for k, v in self.parse_errors.items()},
            **{f"failed:{k}": v for k, v in self.failed.items()},
            "unresolved": self.unresolved,
            "no_room": self.no_room,
        }
        return dict(sorted(((k, v) for k, v in counts.items() if v), key=lambda kv: (-kv[1], kv[0])))

    def add(self, key: tuple[str, str, int], rounds: Iterable[RoundRecord]) -> None:
        """Count the cleaning rounds of one rollout (``key``: its source, id and rollout index)."""
        for rnd in rounds:
            clean = rnd.clean
            if clean is None:
                continue
            self.rounds += 1
            self.skipped_commands += len(clean.skipped)
            outcome, kind = round_outcome(clean)
            if outcome == "parse_error":
                self.parse_errors[kind] = self.parse_errors.get(kind, 0) + 1
            elif outcome == "failed":
                self.failed[kind] = self.failed.get(kind, 0) + 1
            else:
                setattr(self, outcome, getattr(self, outcome) + 1)
            if outcome in ("applied", "nothing_to_delete"):
                continue
            reason = f"{outcome}:{kind}" if kind else outcome
            if reason not in self.examples:
                said = clean.error or clean.no_room or clean.raw_output or ""
                self.examples[reason] = {
                    "source": key[0], "id": key[1], "rollout": key[2], "round": rnd.index,
                    "said": said[:160] + ("..." if len(said) > 160 else ""),
                }  # fmt: skip

    def merged(self, other: CleaningTally) -> CleaningTally:
        """Both tallies' counts summed (``self``'s examples first)."""

        def total(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}

        return CleaningTally(
            rounds=self.rounds + other.rounds, applied=self.applied + other.applied,
            nothing_to_delete=self.nothing_to_delete + other.nothing_to_delete,
            unresolved=self.unresolved + other.unresolved, no_room=self.no_room + other.no_room,
            skipped_commands=self.skipped_commands + other.skipped_commands,
            parse_errors=total(self.parse_errors, other.parse_errors), failed=total(self.failed, other.failed),
            examples={**other.examples, **self.examples},
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds, "calls": self.calls, "applied": self.applied,
            "nothing_to_delete": self.nothing_to_delete, "unresolved": self.unresolved, "no_room": self.no_room,
            "skipped_commands": self.skipped_commands, "parse_errors": dict(self.parse_errors),
            "failed": dict(self.failed), "unusable": self.unusable,
            "unusable_fraction": round(self.unusable_fraction, 4),
            "unusable_lower_bound": round(self.unusable_lower_bound, 4), "examples": self.examples,
        }  # fmt: skip

    def format(self) -> str:
        """One line for the run's summary."""
        parts = [
            f"{self.rounds} rounds, {self.calls} calls", f"{self.applied} applied",
            f"{self.nothing_to_delete} nothing to delete", f"{self.unresolved} unresolved",
            f"{self.skipped_commands} commands skipped", f"parse errors {self.parse_errors or 0}",
            f"failed calls {self.failed or 0}", f"no room {self.no_room}",
        ]  # fmt: skip
        return f"cleaning: {'; '.join(parts)}; unusable {100 * self.unusable_fraction:.1f}%"


@dataclass(frozen=True)
class CleaningRule:
    """When a Free()LM run is flagged: more than ``max_unusable`` of its rounds unusable, unless ``accept``.

    "More than" beyond sampling noise: the lower end of the fraction's 95% interval
    (:attr:`CleaningTally.unusable_lower_bound`) must exceed ``max_unusable``.
    """

    max_unusable: float = DEFAULT_MAX_UNUSABLE
    accept: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CleaningRule:
        return cls(max_unusable=args.max_unusable_cleaning, accept=args.accept_unusable_cleaning)

    def verdict(self, tally: CleaningTally) -> str:
        """``ok``, ``flagged``, ``accepted`` (flagged but ``accept``), or ``no_cleaning`` (no round to judge)."""
        if tally.rounds == 0:
            return "no_cleaning"
        if tally.unusable_lower_bound <= self.max_unusable:
            return "ok"
        return "accepted" if self.accept else "flagged"

    def report(self, tally: CleaningTally) -> dict[str, Any]:
        """The manifest's ``cleaning``: the output's tally, the limit and the verdict."""
        reasons = tally.reasons()
        return {
            "output": tally.to_dict(),
            "max_unusable": self.max_unusable,
            "accept_unusable": self.accept,
            "verdict": self.verdict(tally),
            "dominant": next(iter(reasons), None),
        }


def add_rule_arguments(group: Any) -> None:
    """The rule's two flags (neither decides results: they judge a run, never change it)."""
    group.add_argument(
        "--max-unusable-cleaning", metavar="FRACTION", type=float, default=DEFAULT_MAX_UNUSABLE,
        help="with --mode freelm: flag the run (exit 3) when more than this fraction of the cleaning rounds in the "
        "output gave no usable deletion list (a failed call, a parse error, only unresolvable spans, no room), "
        "beyond sampling noise (the lower end of the fraction's 95%% interval)",
    )  # fmt: skip
    group.add_argument(
        "--accept-unusable-cleaning", action="store_true",
        help="accept such a run (exit 0): for the ICL baseline and other cleaners expected to miss the format",
    )  # fmt: skip


def validate_rule_arguments(args: argparse.Namespace) -> None:
    if not 0 <= args.max_unusable_cleaning < 1:
        raise ValueError(f"--max-unusable-cleaning must be in [0, 1), got {args.max_unusable_cleaning}")


#: Where each reason's likely cause and check are (a failed call by its own reason).
_GROUP = {"timeout": "unreachable", "connection": "unreachable", "server_error": "unreachable", "no_room": "context"}

#: Per group: the likely cause, and how to check it (``{view}``: a ``freelm view`` command on an example rollout).
_CAUSES: dict[str, tuple[str, str]] = {
    "parse_error": (
        "the cleaner's answers are not deletion lists: the adapter was not trained on this template, "
        "or the adapter name is not the Free-Module's",
        "{view} shows the raw answers round by round; `freelm template infer --sft ROWS -o T.txt` recovers the "
        "template an adapter was trained on from its SFT rows (pass it with --clean-template T.txt, or as "
        "CLEAN_TEMPLATE in a reproduction config)",
    ),
    "unresolved": (
        "the cleaner names spans that are not in the thinking: the adapter was not trained on this template, "
        "or not on this model's text",
        "{view} shows each command and why the executor skipped it; `freelm template infer --sft ROWS -o T.txt` "
        "recovers the template an adapter was trained on",
    ),
    "unknown_adapter": (
        "the cleaner endpoint does not serve an adapter under this name",
        "GET /v1/models on the cleaner endpoint lists what it serves (SGLang --lora-paths NAME=PATH, vLLM "
        "--lora-modules NAME=PATH); --adapter-name must be that NAME",
    ),
    "context": (
        "the cleaning prompt and its answer budget do not fit the cleaner's window",
        "the served context length (/server_info, /v1/models) against the template's length, --clean-every and "
        "--clean-max-tokens; {view} shows the failed rounds",
    ),
    "unreachable": (
        "the cleaner endpoint was down, overloaded or too slow",
        "GET /health on every --cleaner-endpoint (default: the reasoner's) and --timeout; the rollouts already "
        "written keep their uncleaned rounds: move the output aside to redo them",
    ),
    "other": ("the cleaning calls failed", "{view} shows each failed round's error; so does the cleaner server's log"),
}


def flag_message(tally: CleaningTally, rule: CleaningRule, *, output: Path, cleaner: str) -> str:
    """The one message of a flagged or accepted run: how much, the dominant reason, its likely cause, how to check.

    ``cleaner`` says what the run cleaned with (:func:`describe_cleaner`), so the
    template and the adapter name are in front of whoever reads the message.
    """
    reasons = tally.reasons()
    dominant, count = next(iter(reasons.items()))
    head, _, kind = dominant.partition(":")
    reason = kind if head == "failed" else head
    cause, check = _CAUSES.get(_GROUP.get(reason, reason), _CAUSES["other"])
    example = tally.examples.get(dominant)
    view, said = "`freelm view OUT --id ID`", ""
    if example:
        view = (
            f"`freelm view {output} --source {example['source']} --id {example['id']} --rollout {example['rollout']}`"
        )
        where = f"{example['source']} {example['id']} rollout {example['rollout']} round {example['round']}"
        said = f"; first in {where}: {example['said']!r}"
    if rule.verdict(tally) == "accepted":
        status = "accepted by --accept-unusable-cleaning"
    else:
        status = (
            f"every rollout is kept in {output} and its manifest marks the run flagged; exit {EXIT_CLEANING}: "
            "re-running the same command adds nothing. --accept-unusable-cleaning accepts such a run (the ICL baseline)"
        )
    others = ", ".join(f"{k} {v}" for k, v in reasons.items())
    return (
        f"cleaning gave no usable deletion list in {tally.unusable} of {tally.rounds} rounds "
        f"({100 * tally.unusable_fraction:.1f}%, at least {100 * tally.unusable_lower_bound:.1f}% at 95% confidence; "
        f"limit {100 * rule.max_unusable:.1f}%, --max-unusable-cleaning): "
        f"dominant reason {dominant} ({count}{said}); all: {others}\n"
        f"  cleaner: {cleaner}\n"
        f"  likely cause: {cause}\n"
        f"  check: {check.format(view=view)}\n"
        f"  {status}"
    )


def describe_cleaner(name: str, settings: dict[str, Any] | None, template: str | Path | None) -> str:
    """``'free', adapter 'free', template T, sha256 ...``: what a run cleaned with, as its settings say.

    ``template`` is the ``--clean-template`` given (None: the project's default), named only for cleaners
    that have one; a template with the default's text is called the project's default whatever its path.
    """
    settings = settings or {}
    parts = [repr(name)]
    if settings.get("adapter"):
        parts.append(f"adapter {settings['adapter']!r}")
    if "template_sha256" in settings:
        from freelm.cleaners.prompted import template_digest

        digest = str(settings["template_sha256"])
        default = " (the project's default)" if digest == template_digest(None, {}) else ""
        parts.append(f"template {template or DEFAULT_CLEAN_TEMPLATE}{default}, sha256 {digest[:12]}")
    return ", ".join(parts)
