"""What the loop sends after a cleaning under each resume strategy (docs/free.md, "Resuming after a deletion").

Re-prefill keeps the ids before the first deletion and re-encodes the rest; the eviction strategies keep every
surviving id verbatim and name the removed token ranges, so an engine can drop exactly their KV. The reasoner here
is the counting model answering one token id per character (an encoding the tokenizer never produces), so whether
an id was kept or re-encoded shows.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from freelm.backends.base import RESUME_STRATEGIES, GenerateRequest, GenerateResult
from freelm.cleaners.base import CleanOutcome
from freelm.free import Deletion, apply_deletions
from freelm.loop import LoopConfig, run_rollout
from freelm.testing.counting import CountingBackend, counting_answer, counting_tokenizer

TARGET = 24
PROBLEM = "Count to 24 in steps."
TOKENIZER = counting_tokenizer(TARGET)


@dataclass
class CharIds:
    """The counting model answering one id per character, remembering every reasoning call and its answer."""

    inner: CountingBackend = field(default_factory=lambda: CountingBackend(TOKENIZER, target=TARGET))
    calls: list[tuple[GenerateRequest, GenerateResult]] = field(default_factory=list)
    name: str = "char-ids"

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await self.inner.generate(request)
        result.output_ids = [TOKENIZER.encode(ch)[0] for ch in result.text]
        result.completion_tokens = len(result.output_ids)
        self.calls.append((request, result))
        return result

    async def aclose(self) -> None:
        return None


@dataclass
class Scripted:
    """Deletes the given (prefix, suffix) spans at the first cleaning whose thinking holds them all, then nothing."""

    spans: list[tuple[str, str]]
    name: str = "scripted"
    done: bool = False

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        ready = not self.done and all(p in thinking and s in thinking.split(p, 1)[-1] for p, s in self.spans)
        commands = [Deletion(p, s) for p, s in self.spans] if ready else []
        edit = apply_deletions(thinking, commands)
        self.done = self.done or bool(edit.spans)
        return CleanOutcome(edit=edit)


def rollout(strategy: str, spans: list[tuple[str, str]]):
    reasoner = CharIds()
    config = LoopConfig(clean_every=40, max_tokens=1000, context_limit=1000, resume=strategy)
    result = asyncio.run(
        run_rollout(PROBLEM, reasoner=reasoner, tokenizer=TOKENIZER, cleaner=Scripted(spans), config=config)
    )
    assert result.finish_reason == "stop" and result.response.endswith(counting_answer(TARGET))
    return result, reasoner.calls


def after_the_deletion(calls):
    """(previous call's full context, the call after the one cleaning that deleted something)."""
    for (before, answer), (request, _) in zip(calls, calls[1:]):
        if len(request.input_ids) < len(before.input_ids) + len(answer.output_ids):
            return before.input_ids + answer.output_ids, request
    raise AssertionError("nothing was deleted")


def test_an_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="resume"):
        LoopConfig(resume="evict")


@pytest.mark.parametrize("strategy", ["evict-gaps", "evict-rerotate"])
def test_eviction_keeps_every_surviving_id_verbatim_and_names_the_removed_ranges(strategy):
    result, calls = rollout(strategy, [("step 2\n", "step 4\n"), ("step 6\n", "step 7\n")])
    previous, request = after_the_deletion(calls)
    removed = request.eviction.removed
    assert request.eviction.strategy == strategy and len(removed) == 2
    kept = previous[: removed[0][0]] + previous[removed[0][1] : removed[1][0]] + previous[removed[1][1] :]
    assert request.input_ids == kept  # every other id as the model sampled it, after the deletions too
    assert TOKENIZER.decode(previous[removed[0][0] : removed[0][1]]) == "step 2\nstep 3\nstep 4\n"
    assert TOKENIZER.decode(previous[removed[1][0] : removed[1][1]]) == "step 6\nstep 7\n"
    assert all(req.eviction is None for req, _ in calls if req is not request)  # only the call after the deletion
    clean = next(r.clean for r in result.rounds if r.clean is not None and r.clean.deleted_spans)
    assert clean.tokens_deleted == sum(end - start for start, end in removed)


def test_re_prefill_re_encodes_after_the_first_deletion_and_sends_no_hint():
    _, calls = rollout("reprefill", [("step 2\n", "step 4\n")])
    previous, request = after_the_deletion(calls)
    assert request.eviction is None
    start = next(i for i, (a, b) in enumerate(zip(previous, request.input_ids)) if a != b)  # the first deletion
    tail = TOKENIZER.decode(request.input_ids[start:])
    assert request.input_ids[start:] == TOKENIZER.encode(tail) != [TOKENIZER.encode(ch)[0] for ch in tail]


def test_a_deletion_inside_a_token_is_re_encoded_from_there_the_ones_before_it_evicted():
    """The executor's text is what the model resumes on, whatever the strategy; a span that starts inside a token
    cannot be evicted as whole tokens, so from there the rest is re-encoded (and prefilled again), as re-prefill
    does. Here one id per character makes every boundary a token boundary except the ones the tokenizer makes."""
    from freelm.loop import _whole_tokens_removed

    thinking = "step 1\nstep 2\nstep 3\nstep 4\nstep 5\n"
    ids = TOKENIZER.encode(thinking)  # "step", " 1", "\n", ...: words span several characters
    edit = apply_deletions(thinking, [Deletion("step 2", "\n"), Deletion("tep 4", "\n")])
    new_ids, shared, removed = _whole_tokens_removed(TOKENIZER, ids, thinking, edit)
    assert TOKENIZER.decode(new_ids) == edit.text == "step 1\nstep 3\nsstep 5\n"
    assert [TOKENIZER.decode(ids[a:b]) for a, b in removed] == ["step 2\n"]  # the aligned one only
    assert shared == removed[0][0] == 3
    head = ids[:3] + ids[6:9]  # "step 1\n" and "step 3\n" verbatim
    assert new_ids[: len(head)] == head and new_ids[len(head) :] == TOKENIZER.encode("sstep 5\n")


def test_a_deletion_of_nothing_sends_the_same_calls_under_every_strategy():
    runs = [rollout(strategy, [("no such line", "anywhere")]) for strategy in RESUME_STRATEGIES]
    requests = [[(r.input_ids, r.eviction) for r, _ in calls] for _, calls in runs]
    assert requests[0] == requests[1] == requests[2] and all(e is None for _, e in requests[0])
    assert [r.response for r, _ in runs] == [runs[0][0].response] * 3


def test_the_strategy_is_a_hashed_setting_recorded_with_the_run_and_reprefill_keeps_earlier_hashes():
    from freelm.run.spec import RunSpec

    def settings(*flags: str) -> dict:
        return RunSpec.from_argv(["--data", "d.jsonl", "--output", "o.jsonl", *flags]).settings.to_dict()

    assert "resume" not in settings()["loop"] and settings() == settings("--resume", "reprefill")
    assert settings("--resume", "evict-rerotate")["loop"]["resume"] == "evict-rerotate"  # what the manifest stores
    assert "resume" not in settings("--mode", "vanilla", "--resume", "evict-gaps")["loop"]  # nothing is cleaned


def test_records_written_before_the_resume_fields_still_read():
    from freelm.records import RoundRecord

    old = {
        "index": 0, "generated_text": "step 1\n", "generated_tokens": 3, "prompt_tokens": 20, "context_tokens": 23,
        "reused_tokens": 0, "cached_tokens": None, "finish_reason": "length", "latency_s": 0.1,
    }  # fmt: skip
    record = RoundRecord.from_dict(old)
    assert (record.evicted_tokens, record.rerotated_tokens, record.reprefilled_tokens) == (0, 0, None)
