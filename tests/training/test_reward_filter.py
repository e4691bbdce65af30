"""The reward filter: pruned and unpruned continuations of a cut share their seeds, and how one cut is decided.

The counting model ignores seeds, so pairing was never tested. Here the
reasoner answers right or wrong by a coin drawn from the request's seed alone
(the context does not matter): with paired seeds a harmless deletion scores
exactly as the unpruned thinking, without them it is rejected about as often as
a coin says so.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from freelm.backends.base import GenerateRequest, GenerateResult
from freelm.data import Problem
from freelm.evaluation.extract import extract_answer
from freelm.free import format_commands
from freelm.loop import LoopConfig
from freelm.prompts import THINK_CLOSE
from freelm.testing.counting import counting_tokenizer
from freelm.training.cuts import Cut
from freelm.training.reward import RewardFilter
from freelm.training.synth import Synthesizer, keeps_empty
from freelm.training.teachers import CleanerTeacher, FunctionTeacher, TeacherError, TeacherReply

TOKENIZER = counting_tokenizer(30)
THINKING = "".join(f"step {n}\n" for n in range(1, 7))
K = 4


@dataclass
class CoinBackend:
    """Closes the thinking with the gold answer when ``Random(seed)`` says so, else a wrong one."""

    seeds_by_context: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    name: str = "coin"

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        assert isinstance(request.seed, int), f"every continuation needs an integer seed, got {request.seed!r}"
        prompt, context = TOKENIZER.decode(request.input_ids).rsplit("<think>\n", 1)
        assert "Count to 30." in prompt, "the continuation must be of the cut's own problem"
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
    scores, all_seeds = [], []
    for cut in cuts(12):
        backend.seeds_by_context.clear()
        a = asyncio.run(reward(backend).accuracy(cut, pruned))
        b = asyncio.run(reward(backend).accuracy(cut, THINKING))
        seeds = dict(backend.seeds_by_context)
        assert sorted(seeds[pruned]) == sorted(seeds[THINKING]) and len(set(seeds[THINKING])) == K
        assert a == b
        scores.append(a)
        all_seeds += seeds[THINKING]
    assert len(set(scores)) > 1, "the coin backend must make accuracy depend on the seeds"
    assert len(set(all_seeds)) == len(all_seeds)  # no two cuts draw the same continuations


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


# --------------------------------------------------------------------------- deciding one cut


@dataclass
class ScriptedTeacher:
    text: str
    name: str = "scripted"

    async def suggest(self, problem: Problem, thinking: str) -> TeacherReply:
        return TeacherReply(self.text, prompt_tokens=11, completion_tokens=7)


def decide(text: str, tmp_path, keep_empty: float = 0.1, cut: Cut | None = None):
    synth = Synthesizer(
        ScriptedTeacher(text), reward(CoinBackend()), tmp_path / "sft.jsonl", tmp_path / "log.jsonl",
        keep_empty=keep_empty,
    )  # fmt: skip
    return asyncio.run(synth.decide(cut or cuts(1)[0])).outcome


def test_decision_records_the_teachers_cost_and_the_savings(tmp_path):
    outcome = decide('[{"prefix": "step 2\\n", "suffix": "step 4\\n"}]', tmp_path)
    assert outcome.status == "accepted"
    assert (outcome.teacher_prompt_tokens, outcome.teacher_completion_tokens) == (11, 7)
    pruned = THINKING.replace("step 2\nstep 3\nstep 4\n", "")
    assert outcome.tokens_before == len(TOKENIZER.encode(THINKING))
    assert outcome.tokens_saved == outcome.tokens_before - len(TOKENIZER.encode(pruned)) > 0
    assert outcome.chars_saved == len(THINKING) - len(pruned)


def test_malformed_items_alone_are_a_parse_error_beside_a_valid_one_they_are_dropped(tmp_path):
    assert decide('[{"prefix": "step 2\\n"}]', tmp_path).status == "teacher_parse_error"
    outcome = decide('[{"prefix": "step 2\\n", "suffix": "step 3\\n"}, 5]', tmp_path)
    assert outcome.status == "accepted" and outcome.commands == 1


def test_empty_answers_are_kept_or_dropped_per_cut(tmp_path):
    statuses = {cut.problem.id: decide("[]", tmp_path, keep_empty=0.5, cut=cut).status for cut in cuts(16)}
    expected = {c.problem.id: "empty_kept" if keeps_empty(c.key, 0.5) else "empty_dropped" for c in cuts(16)}
    assert statuses == expected and set(statuses.values()) == {"empty_kept", "empty_dropped"}


def test_bad_filter_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="comparison must be 'ge' or 'gt'"):
        RewardFilter(CoinBackend(), TOKENIZER, ExactGrader(), comparison="eq")  # type: ignore[arg-type]


def test_each_decision_parses_and_applies_the_teachers_answer_once_for_its_log_line_and_its_row(tmp_path, monkeypatch):
    import freelm.training.synth as synth_module
    from freelm.free import Deletion, apply_deletions, parse_commands

    calls = {"parse": 0, "apply": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(synth_module, "parse_commands", counted("parse", parse_commands))
    monkeypatch.setattr(synth_module, "apply_deletions", counted("apply", apply_deletions))
    answer = '[{"prefix": "step 2\\n", "suffix": "step 3\\n"}, {"prefix": "nowhere", "suffix": "x"}]'
    synth = Synthesizer(ScriptedTeacher(answer), reward(CoinBackend()), tmp_path / "sft.jsonl", tmp_path / "log.jsonl")
    summary = asyncio.run(synth.run(cuts(3), progress=False))
    assert summary.statuses == {"accepted": 3} and calls == {"parse": 3, "apply": 3}
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    expected = format_commands([Deletion("step 2\n", "step 3\n")]) + "<|im_end|>"  # the command that applied
    assert [row["completion"] for row in rows] == [expected] * 3


def test_a_registered_cleaner_teaches_through_its_command_text():
    from freelm.cleaners.oracle import oracle_output
    from freelm.cleaners.registry import get_cleaner

    thinking = "#5 10\n#4 47\n#3 84\n#2 "
    problem = Problem(id="1", source="counter", prompt="Start at 10.", answer="0")
    oracle = CleanerTeacher(get_cleaner("oracle").cls())
    reply = asyncio.run(oracle.suggest(problem, thinking))
    assert oracle.name == "oracle" and reply.text == oracle_output(thinking) != "[]"
    with pytest.raises(TeacherError, match="'headtail' edits spans without commands"):
        asyncio.run(CleanerTeacher(get_cleaner("headtail").cls(tokenizer=TOKENIZER)).suggest(problem, thinking))
