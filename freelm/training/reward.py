"""The reward filter of synthesis: does a suggested deletion hurt the base model?

"Does not hurt" is measured, not assumed: k continuations of the base model (no
cleaner) from the pruned thinking and k from the unpruned thinking are graded
with the evaluation grader, and the suggestion is kept only if pruned accuracy
compares favourably (``>=`` by default) with unpruned accuracy. Both sides use
the same seeds, which depend only on the cut, so the comparison is paired.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from freelm.backends.base import Backend
from freelm.loop import LoopConfig, run_rollout
from freelm.tokenizer import Tokenizer
from freelm.training.cuts import Cut


class AnswerGrader:
    """The evaluation grader (answer after ``</think>``, then math-verify in worker processes) for async callers.

    The worker pool serves one batch at a time, so batches queue on a lock and
    run in a thread, leaving the event loop free for generation.
    """

    def __init__(self, pool: Any):
        self.pool = pool
        self._lock = asyncio.Lock()

    async def correct(self, gold: str, responses: Sequence[str]) -> list[bool]:
        from freelm.evaluation.extract import extract_answer
        from freelm.evaluation.grade import grade_pairs

        answers = [extract_answer(response).answer for response in responses]
        async with self._lock:
            grades = await asyncio.to_thread(grade_pairs, [(gold, a) for a in answers], self.pool)
        return [grades[(gold, a)].correct for a in answers]


@dataclass
class RewardFilter:
    """Continue ``k`` base-model rollouts from a context and compare pruned with unpruned accuracy."""

    reasoner: Backend
    tokenizer: Tokenizer
    grader: AnswerGrader
    k: int = 4
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_tokens=8192))
    comparison: Literal["ge", "gt"] = "ge"
    margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.comparison not in ("ge", "gt"):
            raise ValueError(f"comparison must be 'ge' or 'gt', got {self.comparison!r}")

    async def accuracy(self, cut: Cut, thinking: str) -> float:
        """Share of k continuations from ``thinking`` graded correct; seeds depend only on the cut (paired)."""
        base = zlib.crc32(json.dumps(cut.key).encode()) + self.seed * 7919
        results = await asyncio.gather(
            *(
                run_rollout(
                    cut.problem.prompt,
                    reasoner=self.reasoner,
                    tokenizer=self.tokenizer,
                    cleaner=None,
                    config=self.loop,
                    seed=(base + i) % (2**31),
                    initial_response=thinking,
                )
                for i in range(self.k)
            )
        )
        correct = await self.grader.correct(cut.problem.answer or "", [r.response for r in results])
        return sum(correct) / self.k

    def accepts(self, pruned: float, unpruned: float) -> bool:
        gain = pruned - unpruned - self.margin
        return gain > 1e-12 if self.comparison == "gt" else gain >= -1e-12
