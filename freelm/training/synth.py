"""Reward-filtered synthesis of Free-Module training data: the synthesizer (``freelm synth`` runs it).

The paper's recipe: cut vanilla trajectories where the loop would clean
(:mod:`freelm.training.cuts`), ask a strong teacher which spans to delete
(:mod:`freelm.training.teachers`), and keep a suggestion only when deleting it
does not hurt the base model (:mod:`freelm.training.reward`).

Every decided example is appended to a log (``sft.synth.jsonl`` beside ``sft.jsonl``) with its
status, both accuracies and the token savings; accepted ones also go to the SFT
output. Re-running skips every key found in either file, so a killed run
resumes where it stopped. Teacher failures (network, 5xx after retries) are
not "decided" and are retried by the next run.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from freelm.free import Edit, apply_deletions, parse_commands
from freelm.jsonl import append_jsonl, iter_jsonl, repair_torn_tail
from freelm.training.cuts import Cut, Key
from freelm.training.reward import RewardFilter
from freelm.training.sft_data import END_OF_TURN, build_row
from freelm.training.teachers import Teacher, TeacherError

Status = Literal["accepted", "rejected_reward", "empty_kept", "empty_dropped", "unresolvable", "teacher_parse_error"]
ACCEPTED = ("accepted", "empty_kept")


@dataclass
class SynthOutcome:
    """One decided example: a line of the synthesis log (accepted ones are also SFT rows)."""

    source: str
    id: str
    rollout: int
    cut_tokens: int
    status: Status
    commands: int = 0
    dropped_commands: int = 0
    pruned_accuracy: float | None = None
    unpruned_accuracy: float | None = None
    tokens_before: int = 0
    tokens_saved: int = 0
    chars_saved: int = 0
    teacher_prompt_tokens: int = 0
    teacher_completion_tokens: int = 0
    teacher_output: str = ""

    @property
    def key(self) -> Key:
        return (self.source, self.id, self.rollout, self.cut_tokens)


@dataclass
class Decision:
    """One cut decided: the teacher's commands are parsed and applied once, for the log line and the SFT row alike."""

    cut: Cut
    outcome: SynthOutcome
    edit: Edit | None = None  # the commands applied to the cut's thinking; None when they did not parse

    @property
    def accepted(self) -> bool:
        return self.outcome.status in ACCEPTED


@dataclass
class SynthSummary:
    """Acceptance rates and teacher cost of one run (resumed examples are counted in ``resumed`` only)."""

    cuts: int = 0
    resumed: int = 0
    teacher_errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    teacher_prompt_tokens: int = 0
    teacher_completion_tokens: int = 0
    tokens_saved_accepted: int = 0

    def add(self, outcome: SynthOutcome) -> None:
        self.statuses[outcome.status] += 1
        self.teacher_prompt_tokens += outcome.teacher_prompt_tokens
        self.teacher_completion_tokens += outcome.teacher_completion_tokens
        if outcome.status in ACCEPTED:
            self.tokens_saved_accepted += outcome.tokens_saved

    def to_dict(self) -> dict[str, Any]:
        decided = sum(self.statuses.values())
        accepted = sum(self.statuses[s] for s in ACCEPTED)
        with_commands = decided - self.statuses["empty_kept"] - self.statuses["empty_dropped"]
        return {
            **asdict(self),
            "statuses": dict(self.statuses),
            "decided": decided,
            "accepted": accepted,
            "acceptance_rate": accepted / decided if decided else None,
            "reward_acceptance_rate": self.statuses["accepted"] / with_commands if with_commands else None,
            "mean_tokens_saved_accepted": self.tokens_saved_accepted / accepted if accepted else None,
        }


def keeps_empty(key: Key, share: float) -> bool:
    """Deterministic per key, so a resumed run keeps the same ``[]`` examples."""
    return random.Random(json.dumps(key)).random() < share


@dataclass
class Synthesizer:
    """Decides cuts one by one (concurrently) and writes their outcomes; see the module docstring."""

    teacher: Teacher
    reward: RewardFilter
    output: Path
    log: Path
    template: str | Path | None = None
    end_of_turn: str = END_OF_TURN
    keep_empty: float = 0.1
    concurrency: int = 8

    def finished_keys(self) -> set[Key]:
        keys: set[Key] = set()
        for path in (self.output, self.log):
            if path.exists():
                repair_torn_tail(path)
                for number, row in iter_jsonl(path):
                    try:
                        keys.add((str(row["source"]), str(row["id"]), int(row["rollout"]), int(row["cut_tokens"])))
                    except (KeyError, TypeError, ValueError) as exc:
                        raise ValueError(f"{path}:{number}: not a synthesis row ({exc})") from exc
        return keys

    async def run(self, cuts: Sequence[Cut], progress: bool = True) -> SynthSummary:
        from tqdm.auto import tqdm

        done = self.finished_keys()
        todo = [cut for cut in cuts if cut.key not in done]
        summary = SynthSummary(cuts=len(cuts), resumed=len(cuts) - len(todo))
        semaphore = asyncio.Semaphore(self.concurrency)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)

        async def one(cut: Cut) -> Decision | None:
            async with semaphore:
                try:
                    return await self.decide(cut)
                except TeacherError:
                    return None

        with (
            self.output.open("a", encoding="utf-8") as out,
            self.log.open("a", encoding="utf-8") as log,
            tqdm(total=len(todo), desc="synth", unit="ex", disable=not progress) as bar,
        ):
            for next_done in asyncio.as_completed([one(cut) for cut in todo]):
                decision = await next_done
                bar.update(1)
                if decision is None:
                    summary.teacher_errors += 1
                    continue
                summary.add(decision.outcome)
                if decision.accepted:  # SFT row first: a kill in between loses its log line, never the row
                    append_jsonl(out, self.sft_row(decision))
                append_jsonl(log, asdict(decision.outcome))
                bar.set_postfix(accepted=sum(summary.statuses[s] for s in ACCEPTED))
        return summary

    async def decide(self, cut: Cut) -> Decision:
        reply = await self.teacher.suggest(cut.problem, cut.thinking)
        outcome = SynthOutcome(
            source=cut.problem.source,
            id=cut.problem.id,
            rollout=cut.rollout,
            cut_tokens=cut.cut_tokens,
            status="teacher_parse_error",
            teacher_prompt_tokens=reply.prompt_tokens,
            teacher_completion_tokens=reply.completion_tokens,
            teacher_output=reply.text,
            tokens_before=len(self.reward.tokenizer.encode(cut.thinking)),
        )
        decision = Decision(cut, outcome)
        commands = parse_commands(reply.text)
        if commands.error or (not commands and commands.dropped):
            return decision
        decision.edit = edit = apply_deletions(cut.thinking, commands)
        outcome.commands, outcome.dropped_commands = len(edit.applied), len(edit.skipped)
        if not commands:
            if not keeps_empty(cut.key, self.keep_empty):
                outcome.status = "empty_dropped"
                return decision
            outcome.status = "empty_kept"
            outcome.unpruned_accuracy = outcome.pruned_accuracy = await self.reward.accuracy(cut, cut.thinking)
            return decision
        if not edit.applied:
            outcome.status = "unresolvable"
            return decision
        outcome.tokens_saved = outcome.tokens_before - len(self.reward.tokenizer.encode(edit.text))
        outcome.chars_saved = edit.chars_deleted
        outcome.pruned_accuracy, outcome.unpruned_accuracy = await asyncio.gather(
            self.reward.accuracy(cut, edit.text), self.reward.accuracy(cut, cut.thinking)
        )
        accepted = self.reward.accepts(outcome.pruned_accuracy, outcome.unpruned_accuracy)
        outcome.status = "accepted" if accepted else "rejected_reward"
        return decision

    def sft_row(self, decision: Decision) -> dict[str, Any]:
        """The accepted decision as an SFT row: the deletions that applied, and the outcome as metadata."""
        cut, outcome = decision.cut, decision.outcome
        assert decision.edit is not None, "only a decision whose commands parsed is accepted"
        return build_row(
            cut.problem.prompt,
            cut.thinking,
            decision.edit.applied,
            template=self.template,
            end_of_turn=self.end_of_turn,
            source=outcome.source,
            id=outcome.id,
            rollout=outcome.rollout,
            cut_tokens=outcome.cut_tokens,
            pruned_accuracy=outcome.pruned_accuracy,
            unpruned_accuracy=outcome.unpruned_accuracy,
            k=self.reward.k,
            tokens_before=outcome.tokens_before,
            tokens_saved=outcome.tokens_saved,
            teacher=self.teacher.name,
        )
