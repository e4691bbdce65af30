"""The reward filter's comparison is paired: pruned and unpruned continuations of a cut share their seeds.

The counting model ignores seeds, so pairing was never tested. Here the
reasoner answers right or wrong by a coin drawn from the request's seed alone
(the context does not matter): with paired seeds a harmless deletion scores
exactly as the unpruned thinking, without them it is rejected about as often as
a coin says so.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from dataclasses import dataclass, field

from freelm.backends.base import GenerateRequest, GenerateResult
from freelm.data import Problem
from freelm.evaluation.extract import extract_answer
from freelm.loop import LoopConfig
from freelm.prompts import THINK_CLOSE
from freelm.testing.counting import counting_tokenizer
from freelm.training.synth import Cut, FunctionTeacher, RewardFilter, Synthesizer

TOKENIZER = counting_tokenizer(30)
THINKING = "".join(f"step {n}\n" for n in range(1, 7))
K = 4


@dataclass
class CoinBackend:
    """Closes the thinking with the gold answer when ``Random(seed)`` says so, else a wrong one."""

    seeds_by_context: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    name: str = "coin"

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        assert request.seed is not None, "the reward filter must seed every continuation"
        context = TOKENIZER.decode(request.input_ids).rsplit("<think>\n", 1)[-1]
        self.seeds_by_context[context].append(request.seed)
        answer = "30" if random.Random(request.seed).random() < 0.5 else "29"
        ids = TOKENIZER.encode(f"{THINK_CLOSE}\n\\boxed{{{answer}}}")
        return GenerateResult(TOKENIZER.decode(ids), ids, "stop", len(request.input_ids), len(ids))

    async def aclose(self) -> None:
        return None


class ExactGrader:
    async def correct(self, gold: str, responses: list[str]) -> list[bool]:
        return [extract_answer(r).answer == gold for r in responses]


def cuts(n: int) -> list[Cut]:
    return [
        Cut(Problem(id=str(i), source="count", prompt="Count to 30.", answer="30"), 0, 40, THINKING) for i in range(n)
    ]


def reward(backend: CoinBackend, seed: int = 0) -> RewardFilter:
    return RewardFilter(backend, TOKENIZER, ExactGrader(), k=K, loop=LoopConfig(max_tokens=64), seed=seed)  # type: ignore[arg-type]


def test_pruned_and_unpruned_continuations_share_k_distinct_seeds():
    backend = CoinBackend()
    pruned = THINKING.replace("step 2\n", "")
    scores = []
    for cut in cuts(12):
        backend.seeds_by_context.clear()
        a = asyncio.run(reward(backend).accuracy(cut, pruned))
        b = asyncio.run(reward(backend).accuracy(cut, THINKING))
        seeds = dict(backend.seeds_by_context)
        assert sorted(seeds[pruned]) == sorted(seeds[THINKING]) and len(set(seeds[THINKING])) == K
        assert a == b
        scores.append(a)
    assert len(set(scores)) > 1, "the coin backend must make accuracy depend on the seeds"


def test_seeds_differ_between_cuts_and_with_the_filter_seed():
    def seeds(cut: Cut, seed: int) -> list[int]:
        backend = CoinBackend()
        asyncio.run(reward(backend, seed).accuracy(cut, THINKING))
        return sorted(backend.seeds_by_context[THINKING])

    one, two = cuts(2)
    assert seeds(one, 0) == seeds(one, 0)
    assert seeds(one, 0) != seeds(two, 0)
    assert seeds(one, 0) != seeds(one, 1)


def test_a_harmless_deletion_is_never_rejected_by_sampling_noise(tmp_path):
    """Deleting a step the coin model never reads cannot change its answers: with paired seeds every cut passes."""
    teacher = FunctionTeacher(lambda problem, thinking: '[{"prefix": "step 2\\n", "suffix": "step 3\\n"}]')
    synth = Synthesizer(teacher, reward(CoinBackend()), tmp_path / "sft.jsonl", tmp_path / "log.jsonl")
    summary = asyncio.run(synth.run(cuts(16), progress=False))
    assert summary.statuses == {"accepted": 16}
