"""The cleaning schedule: its rules pinned, and the loop, synthesis and the demo's data cleaning at the same points."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from itertools import accumulate

import pytest
from repo_paths import EMBEDDED

from freelm.backends.base import GenerateRequest, GenerateResult
from freelm.cleaners.base import CleanOutcome
from freelm.data import Problem
from freelm.demo.corpus import cleaning_states
from freelm.demo.task import generate_problems, solution
from freelm.free import remove_spans
from freelm.loop import LoopConfig, run_rollout
from freelm.prompts import THINK_CLOSE
from freelm.records import RolloutRecord
from freelm.schedule import CleaningSchedule, may_clean
from freelm.testing.counting import counting_tokenizer
from freelm.tokenizer import Tokenizer
from freelm.training.cuts import Cut, cut_trajectory

EMBEDDED_TOKENIZER = EMBEDDED / "base"


def test_boundaries_are_every_n_tokens_below_the_end():
    schedule = CleaningSchedule(4)
    assert list(schedule.points(13)) == [4, 8, 12]
    assert list(schedule.points(12)) == [4, 8]  # a boundary at the very end has no continuation
    assert list(schedule.points(4)) == []
    with pytest.raises(ValueError, match="interval must be >= 1"):
        CleaningSchedule(0)
    assert list(CleaningSchedule(1).points(4)) == [1, 2, 3]  # --clean-every 1 is the smallest interval, not refused


def test_chunks_stop_at_the_boundary_and_go_past_it_only_to_finish_a_character():
    schedule = CleaningSchedule(32)
    assert [schedule.chunk(n) for n in (0, 31, 32, 40)] == [32, 1, 1, 1]
    assert schedule.chunk(31, split_char=True) == 4 and schedule.chunk(20, split_char=True) == 12


def test_early_cleaning_needs_a_quarter_chunk_of_headroom():
    schedule = CleaningSchedule(32)
    assert [schedule.early(h) for h in (None, 0, 7, 8, 100)] == [None, None, None, 8, 100]
    assert CleaningSchedule(3).early(1) == 1  # a quarter of a tiny chunk is still one token
    assert CleaningSchedule(10).early(2) == 2  # a quarter is counted in whole tokens: 10 // 4 = 2


def test_cleaning_is_due_after_a_full_chunk_or_one_the_window_or_the_headroom_cut_short():
    schedule = CleaningSchedule(32)
    assert schedule.due(since_clean=32, new_tokens=32, room=1000, headroom=None)
    assert not schedule.due(since_clean=20, new_tokens=20, room=1000, headroom=None)  # stopped by the model
    assert schedule.due(since_clean=20, new_tokens=20, room=20, headroom=None)
    assert schedule.due(since_clean=20, new_tokens=20, room=1000, headroom=20)
    assert not schedule.due(since_clean=20, new_tokens=19, room=1000, headroom=20)


def test_only_open_thinking_that_ends_on_a_whole_character_is_cleaned():
    assert may_clean("#3 40\n#2 77")
    assert not may_clean(f"#1 14\n{THINK_CLOSE}")
    assert not may_clean("a split \ufffd")


# --------------------------------------------------------------------------- the three users agree


@dataclass
class ReplayBackend:
    """Serves one fixed trajectory, chunk by chunk, whatever the context (the cleaner below deletes nothing)."""

    ids: list[int]
    tokenizer: Tokenizer
    served: int = 0
    name: str = "replay"

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        chunk = self.ids[self.served : self.served + request.max_new_tokens]
        self.served += len(chunk)
        finish = "stop" if self.served == len(self.ids) else "length"
        return GenerateResult(self.tokenizer.decode(chunk), chunk, finish, len(request.input_ids), len(chunk))


@dataclass
class RecordingCleaner:
    """Deletes nothing and remembers every thinking the loop showed it."""

    seen: list[str] = field(default_factory=list)
    name: str = "recording"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        self.seen.append(thinking)
        return CleanOutcome(edit=remove_spans(thinking, []))


@dataclass
class Replayed:
    """One trajectory cleaned by the loop (deleting nothing) and cut by synthesis."""

    seen: list[str]  # what the loop showed the cleaner
    at: list[int]  # after how many generated tokens it did
    cuts: list[Cut]


def replay(tokenizer: Tokenizer, problem: Problem, response: str, every: int) -> Replayed:
    ids = tokenizer.encode(response)
    cleaner = RecordingCleaner()
    result = asyncio.run(
        run_rollout(
            problem.prompt,
            reasoner=ReplayBackend(ids, tokenizer),
            tokenizer=tokenizer,
            cleaner=cleaner,
            config=LoopConfig(clean_every=every, max_tokens=10 * len(ids), context_limit=100 * len(ids)),
        )
    )
    assert result.response == response and result.finish_reason == "stop"
    generated = list(accumulate(r.generated_tokens for r in result.rounds))
    at = [n for n, r in zip(generated, result.rounds, strict=True) if r.clean is not None]
    record = RolloutRecord.from_result(
        result, id=problem.id, source=problem.source, rollout=0, seed=0, answer=None, mode="vanilla", config_hash="h"
    )
    return Replayed(cleaner.seen, at, cut_trajectory(record, problem, tokenizer, every))


@pytest.mark.parametrize("every", [5, 24, 32, 48])
def test_the_loop_synthesis_and_the_demo_data_clean_at_the_same_points(every):
    tokenizer = Tokenizer.from_pretrained(EMBEDDED_TOKENIZER)
    for counter in generate_problems(3, seed=11, min_turns=30, max_turns=40):
        problem = Problem(id=counter.id, source="counter", prompt=counter.prompt, answer=None)
        text = solution(counter)
        run = replay(tokenizer, problem, text, every)
        assert len(run.seen) >= 2
        assert run.seen == [c.thinking for c in run.cuts] and run.at == [c.cut_tokens for c in run.cuts]
        assert run.at == list(CleaningSchedule(every).points(len(tokenizer.encode(text))))[: len(run.at)]
        # the demo's states, with every deletion skipped, are the same texts, stopping strictly before </think>
        states = [t for _, t in cleaning_states([counter], tokenizer, (every,), seed=0, skip_rate=1.0)][:-1]
        think_end = len(tokenizer.encode(text.split(THINK_CLOSE)[0]))
        assert states == [t for t, n in zip(run.seen, run.at, strict=True) if n < think_end]


def test_a_mid_character_boundary_is_cleaned_a_token_later_by_the_loop_and_dropped_by_synthesis():
    tokenizer = counting_tokenizer(30)  # trained on ASCII: an emoji is four byte tokens
    problem = Problem(id="1", source="count", prompt="Count.", answer=None)
    response = "step 1\nstep 2 \U0001f600\nstep 3\nstep 4\nstep 5\nstep 6\n" + THINK_CLOSE + "\n\\boxed{6}"
    ids = tokenizer.encode(response)
    split = next(n for n in range(len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    run = replay(tokenizer, problem, response, split)
    assert run.seen[0].endswith("\U0001f600") and split < run.at[0] < split + 4  # waited for the whole character
    assert run.at[1] == run.at[0] + split  # and counted the next chunk from there
    assert split not in [c.cut_tokens for c in run.cuts]
    assert [c.cut_tokens for c in run.cuts] == [
        n
        for n in CleaningSchedule(split).points(len(ids))
        if n != split and THINK_CLOSE not in tokenizer.decode(ids[:n])
    ]
