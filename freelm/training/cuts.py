"""Cutting vanilla trajectories where the loop would clean: the inputs of reward-filtered synthesis.

A cut is the thinking the loop would hand the cleaner at one cleaning point
(:mod:`freelm.schedule`) of a trajectory that was never cleaned, with its
problem and gold answer. Its key (source, id, rollout, cut position) names it in
the synthesis log, so a resumed run skips what is decided.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from freelm.data import Problem
from freelm.prompts import THINK_CLOSE
from freelm.records import RolloutRecord
from freelm.schedule import CleaningSchedule, may_clean
from freelm.tokenizer import Tokenizer

Key = tuple[str, str, int, int]  # (source, id, rollout, cut_tokens)


@dataclass(frozen=True)
class Cut:
    """One cleaning point of a vanilla trajectory: the thinking the loop would hand the cleaner there."""

    problem: Problem
    rollout: int
    cut_tokens: int  # tokens of thinking before the cut (a multiple of clean_every)
    thinking: str

    @property
    def key(self) -> Key:
        return (self.problem.source, self.problem.id, self.rollout, self.cut_tokens)


def cut_trajectory(record: RolloutRecord, problem: Problem, tokenizer: Tokenizer, clean_every: int) -> list[Cut]:
    """The loop's cleaning points on one trajectory: every ``clean_every`` tokens while still thinking.

    The schedule's rules apply as in the loop (the thinking ends at
    ``</think>``), except that a boundary ending mid-character, which the loop
    would clean a token later, is dropped: that later point is not a multiple
    of ``clean_every``. A boundary at the very end of the trajectory has no
    continuation in the data and is not used.
    """
    ids = tokenizer.encode(record.response)
    cuts = []
    for n in CleaningSchedule(clean_every).points(len(ids)):
        thinking = tokenizer.decode(ids[:n])
        if THINK_CLOSE in thinking:
            break
        if may_clean(thinking):
            cuts.append(Cut(problem=problem, rollout=record.rollout, cut_tokens=n, thinking=thinking))
    return cuts


def collect_cuts(
    runs: Iterable[tuple[str, Sequence[RolloutRecord]]],
    problems: Sequence[Problem],
    tokenizer: Tokenizer,
    clean_every: int,
    max_cuts_per_trajectory: int | None = None,
) -> list[Cut]:
    """Cuts of every vanilla trajectory in ``runs`` (``(file name, records)`` pairs).

    Trajectories that were cleaned are an error (their text is already pruned);
    failed ones (``finish_reason == "error"``) are skipped. The gold answer comes
    from the problem file, falling back to the record's.
    """
    by_key = {p.key: p for p in problems}
    cuts: list[Cut] = []
    for path, records in runs:
        for record in records:
            where = f"{path}: record id={record.id!r} source={record.source!r} rollout={record.rollout}"
            if record.cleaning_rounds:
                raise ValueError(f"{where}: has cleaning rounds; synthesis needs vanilla trajectories")
            if record.finish_reason == "error":
                continue
            problem = by_key.get((record.source, record.id))
            if problem is None:
                raise ValueError(f"{where}: no such problem in the problem file")
            if problem.answer is None:
                if record.answer is None:
                    raise ValueError(f"{where}: no gold answer (needed by the reward filter)")
                problem = replace(problem, answer=record.answer)
            found = cut_trajectory(record, problem, tokenizer, clean_every)
            cuts += found[:max_cuts_per_trajectory] if max_cuts_per_trajectory is not None else found
    return cuts
