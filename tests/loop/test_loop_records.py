"""What a rollout records and sends, field by field: seeds, budgets, per-round telemetry, odd server answers.

The efficiency report and resumable reproducibility read these fields, so each
is checked against what the reasoner actually received and answered.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
from dataclasses import dataclass, field, replace

import pytest

from freelm.backends.base import GenerateRequest, GenerateResult, SamplingParams, TransientBackendError
from freelm.cleaners import FreeModuleCleaner
from freelm.cleaners.base import CleanOutcome
from freelm.free import apply_deletions
from freelm.loop import LoopConfig, run_rollout
from freelm.prompts import render_reasoning_prompt
from freelm.records import RolloutRecord
from freelm.setting import config_of
from freelm.testing.counting import CountingBackend, counting_tokenizer
from freelm.tokenizer import Tokenizer

TOKENIZER = counting_tokenizer(30)


@dataclass
class Recording:
    """The counting model, recording reasoning requests; ``tweak`` may rewrite its answers."""

    inner: CountingBackend = field(default_factory=lambda: CountingBackend(TOKENIZER, target=30))
    tweak: object = None
    requests: list[GenerateRequest] = field(default_factory=list)
    results: list[GenerateResult] = field(default_factory=list)
    name: str = "recording"

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await self.inner.generate(request)
        if request.adapter is None:
            await asyncio.sleep(0.01)  # the latency reported below, really spent
            result = replace(result, cached_tokens=7, latency_s=0.01)
            result = self.tweak(result) if self.tweak else result
            self.requests.append(request)
            self.results.append(result)
        return result

    async def aclose(self) -> None:
        return None


def rollout(backend, cleaner=None, seed=None, initial="", **config):
    config = LoopConfig(**{"clean_every": 40, "max_tokens": 2000, "context_limit": 2000, **config})
    return asyncio.run(
        run_rollout("Count to 30.", reasoner=backend, tokenizer=TOKENIZER, cleaner=cleaner, config=config,
                    seed=seed, initial_response=initial)
    )  # fmt: skip


def test_each_call_gets_its_own_reproducible_integer_seed():
    def seeds(seed):
        backend = Recording()
        rollout(backend, FreeModuleCleaner(backend.inner), seed=seed)
        return [r.seed for r in backend.requests]

    five = seeds(5)
    assert len(five) >= 3 and len(set(five)) == len(five)
    assert all(isinstance(s, int) and 0 <= s < 2**31 - 1 for s in five)
    assert seeds(5) == five and seeds(6) != five
    assert set(seeds(None)) == {None}


def test_no_two_calls_share_a_seed_across_rollouts_and_every_seed_fits_an_int32():
    """Rollout seeds span [0, 2**31 - 1) (``rollout_seed``): a call's seed must stay a distinct int32 even at the top."""
    seeds = []
    for base in (*range(25), 2**31 - 2, 2**31 - 3):
        backend = Recording()
        rollout(backend, FreeModuleCleaner(backend.inner), seed=base)
        seeds += [r.seed for r in backend.requests]
    assert len(seeds) > 61 and len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**31 - 1 for s in seeds)


def test_the_call_seeds_of_a_rollout_seed_are_those_of_earlier_runs():
    """A record keeps its rollout seed: re-running it after an upgrade must send the calls the same seeds."""
    for base, first_three in ((5, [5000015, 5000016, 5000017]), (2**31 - 2, [2146483644, 2146483645, 2146483646])):
        backend = Recording()
        rollout(backend, FreeModuleCleaner(backend.inner), seed=base)
        assert [r.seed for r in backend.requests[:3]] == first_three


@dataclass
class Scripted:
    """A cleaner that deletes nothing and answers with every telemetry field set (or raises ``fail``).

    ``window`` makes it one that knows its window (as ``FreeModuleCleaner`` does): its
    headroom is ``window - thinking_tokens``; each ``headroom`` call is kept in ``asked``.
    """

    fail: BaseException | None = None
    window: int | None = None
    asked: list[tuple[str, int]] = field(default_factory=list)
    name: str = "scripted"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        await asyncio.sleep(0.01)  # the latency the record must report
        if self.fail is not None:
            raise self.fail
        return CleanOutcome(
            edit=apply_deletions(thinking, []), raw_output="[]", dropped=["bad entry"], prompt_tokens=11,
            completion_tokens=3, cached_tokens=5, max_new_tokens=77, no_room="tight", endpoint="http://e:1",
        )  # fmt: skip

    def __getattr__(self, name: str):
        if name == "headroom" and self.window is not None:
            return self._headroom
        raise AttributeError(name)

    def _headroom(self, problem: str, thinking_tokens: int) -> int:
        self.asked.append((problem, thinking_tokens))
        return self.window - thinking_tokens


def test_every_field_of_the_cleaners_answer_reaches_the_round_record():
    result = rollout(Recording(), Scripted(), max_clean_rounds=1)
    clean = result.rounds[0].clean
    assert (clean.cleaner, clean.raw_output, clean.dropped, clean.prompt_tokens, clean.completion_tokens) == (
        "scripted", "[]", ["bad entry"], 11, 3
    )  # fmt: skip
    assert (clean.cached_tokens, clean.max_new_tokens, clean.no_room, clean.endpoint) == (5, 77, "tight", "http://e:1")
    assert 0.01 <= clean.latency_s <= result.wall_time_s


def test_a_failed_cleaning_call_is_recorded_with_its_error_and_latency():
    """A backend's error reads as it is; any other exception (a cleaner bug) is named by its type."""
    for fail, error in ((TransientBackendError("down"), "down"), (KeyError("x"), "KeyError: 'x'")):
        result = rollout(Recording(), Scripted(fail=fail), max_clean_rounds=1)
        clean = result.rounds[0].clean
        assert clean.error == error and result.finish_reason == "stop"
        assert 0.01 <= clean.latency_s <= result.wall_time_s


def test_a_cleaner_that_knows_its_window_is_called_before_its_headroom_runs_out():
    """Early cleaning: with 25 tokens of headroom left the chunk ends there, not at --clean-every 40."""
    backend, cleaner = Recording(), Scripted(window=25)
    result = rollout(backend, cleaner, max_clean_rounds=1)
    assert backend.requests[0].max_new_tokens == 25 and result.rounds[0].clean is not None
    assert cleaner.asked[0] == ("Count to 30.", 0)  # the problem and the thinking so far (none yet)
    assert rollout(Recording(), Scripted(), max_clean_rounds=1).rounds[0].generated_tokens == 40  # no window: no bound


def test_round_records_match_the_requests_and_answers():
    backend = Recording()
    result = rollout(backend, FreeModuleCleaner(backend.inner))
    assert len(result.rounds) == len(backend.requests) >= 3
    for i, (rnd, req, res) in enumerate(zip(result.rounds, backend.requests, backend.results, strict=True)):
        assert rnd.index == i and rnd.prompt_tokens == len(req.input_ids)
        assert rnd.generated_tokens == len(res.output_ids) and rnd.context_tokens == len(req.input_ids) + len(
            res.output_ids
        )
        assert (rnd.cached_tokens, rnd.finish_reason, rnd.latency_s) == (7, res.finish_reason, 0.01)
        assert req.max_new_tokens == 40 or res.finish_reason == "stop"  # full chunks after every cleaning
    assert result.rounds[0].reused_tokens == 0
    assert result.wall_time_s >= result.reasoning_time_s == pytest.approx(0.01 * len(result.rounds))
    for rnd in result.rounds:
        if rnd.clean is not None:
            c = rnd.clean
            assert c.cleaner == "free" and c.chars_deleted == sum(e - s for s, e in c.deleted_spans) > 0
            assert c.prompt_tokens > 0 and c.completion_tokens > 0 and c.dropped == [] and 0 <= c.latency_s
            assert c.latency_s <= result.wall_time_s


def test_a_cleaning_round_that_deletes_nothing_keeps_the_whole_context_reusable():
    backend = Recording()
    backend.inner.clean_responses.extend(["[]", "[]"])
    result = rollout(backend, FreeModuleCleaner(backend.inner), max_clean_rounds=2)
    assert [r.reused_tokens for r in result.rounds[1:3]] == [r.context_tokens for r in result.rounds[:2]]


def test_a_dead_cleaner_round_is_recorded_with_the_context_unchanged():
    backend, dead = Recording(), CountingBackend(TOKENIZER)
    dead.fail_next.append(TransientBackendError("down"))
    result = rollout(backend, FreeModuleCleaner(dead), max_clean_rounds=1)
    clean = result.rounds[0].clean
    assert clean.error == "down" and clean.cleaner == "free"
    assert clean.context_tokens_before == clean.context_tokens_after == result.rounds[0].context_tokens
    assert 0 <= clean.latency_s <= result.wall_time_s and result.finish_reason == "stop"


def test_budgets_are_used_to_the_last_token():
    backend = Recording()
    assert rollout(backend, FreeModuleCleaner(backend.inner), max_tokens=41, max_clean_rounds=0).generated_tokens == 41
    result = rollout(Recording(), None)
    limit = result.prompt_tokens + 42
    result = rollout(Recording(), FreeModuleCleaner(CountingBackend(TOKENIZER)), context_limit=limit, clean_every=40,
                     max_clean_rounds=0)  # fmt: skip
    assert result.finish_reason == "context_overflow" and result.final_context_tokens == limit - 1


def test_continuing_from_a_given_thinking():
    backend = Recording()
    initial = "step 1\nstep 2\n"
    result = rollout(backend, None, initial=initial)
    first = backend.requests[0].input_ids
    assert first[-len(TOKENIZER.encode(initial)) :] == TOKENIZER.encode(initial)
    assert result.response.startswith(initial) and not result.rounds[0].generated_text.startswith("step 1\n")
    assert result.rounds[0].generated_text.startswith("step 3\n")


def test_the_configured_problem_suffix_is_in_the_prompt():
    backend = Recording()
    rollout(backend, None, problem_suffix="Answer in Roman numerals.")
    assert "Answer in Roman numerals." in TOKENIZER.decode(backend.requests[0].input_ids)


def test_text_only_answers_are_tokenized_and_odd_finishes_end_as_errors():
    backend = Recording(tweak=lambda r: replace(r, output_ids=[]))
    result = rollout(backend, None)
    assert result.finish_reason == "stop" and result.generated_tokens > 0
    aborted = rollout(Recording(tweak=lambda r: replace(r, finish_reason="abort")), None)
    assert (aborted.finish_reason, aborted.error) == ("error", "reasoner aborted the request")
    empty = rollout(Recording(tweak=lambda r: replace(r, text="", output_ids=[], finish_reason="length")), None)
    assert (empty.finish_reason, empty.error) == ("error", "reasoner returned no tokens without stopping")


def test_loop_config_bounds():
    LoopConfig(clean_every=1, max_tokens=1, context_limit=1, max_clean_rounds=0)
    with pytest.raises(ValueError, match="max_clean_rounds must be >= 0"):
        LoopConfig(max_clean_rounds=-1)
    assert config_of(LoopConfig(clean_every=7))["clean_every"] == 7  # what the config hash reads


def test_the_configured_sampling_reaches_every_reasoning_request():
    """Non-default sampling (the tests' default equals the request's default, which would hide a dropped setting)."""
    sampling = SamplingParams(temperature=0.9, top_p=0.8, top_k=7, min_p=0.05)
    backend = Recording()
    result = rollout(backend, FreeModuleCleaner(backend.inner), seed=3, sampling=sampling)
    assert result.finish_reason == "stop" and len(backend.requests) > 1
    assert all(r.sampling == sampling for r in backend.requests)


def test_the_reasoning_prompt_is_rendered_with_the_tokenizers_chat_template():
    hf = copy.deepcopy(TOKENIZER.hf)
    hf.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}TEMPLATED\n<think>\n"
    templated = Tokenizer(hf)
    backend = Recording(inner=CountingBackend(templated, target=30))
    config = LoopConfig(clean_every=40, max_tokens=2000, context_limit=2000)
    asyncio.run(run_rollout("Count to 30.", reasoner=backend, tokenizer=templated, cleaner=None, config=config))
    first = backend.requests[0].input_ids
    expected = templated.encode(render_reasoning_prompt("Count to 30.", templated))
    assert first[: len(expected)] == expected
    assert "TEMPLATED" in templated.decode(first)


def test_a_record_serializes_as_dataclasses_asdict_would_and_reads_back_equal():
    backend = Recording()
    result = rollout(backend, FreeModuleCleaner(backend.inner))
    assert any(r.clean is not None and r.clean.deleted_spans for r in result.rounds)
    record = RolloutRecord.from_result(
        result, id="7", source="count", rollout=1, seed=3, answer="30", mode="freelm", config_hash="h", prompt="p"
    )
    assert record.to_dict() == dataclasses.asdict(record)
    line = json.dumps(record.to_dict())
    assert (
        json.dumps(RolloutRecord.from_dict(json.loads(line)).to_dict())
        == line
        == json.dumps(dataclasses.asdict(record))
    )
