"""The reasoning/cleaning loop on the deterministic counting model (no torch, milliseconds)."""

from __future__ import annotations

import asyncio
import json
from collections import deque

import pytest

from freelm.backends.base import BackendError, TransientBackendError
from freelm.backends.sglang import SGLangBackend
from freelm.cleaners import FreeModuleCleaner, HeadTailCleaner
from freelm.loop import LoopConfig, run_rollout
from freelm.prompts import THINK_CLOSE, render_reasoning_prompt
from freelm.records import RolloutRecord
from freelm.testing.counting import CountingBackend, counting_answer, counting_tokenizer
from freelm.testing.engines import ScriptedEngine, ScriptedTokenizer
from freelm.testing.sglang_server import SGLangTestServer
from freelm.tokenizer import Tokenizer

TARGET = 60


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return counting_tokenizer(TARGET, steps=200)


def run(coro):
    return asyncio.run(coro)


def rollout(tokenizer, backend, cleaner, **config):
    """One rollout counting to 60; ``context_limit`` and ``max_tokens`` default to a roomy 4000."""
    config = LoopConfig(**{"context_limit": 4000, "max_tokens": 4000, **config})
    return run(run_rollout("Count to 60.", reasoner=backend, tokenizer=tokenizer, cleaner=cleaner, config=config))


def as_record(result) -> RolloutRecord:
    return RolloutRecord.from_result(
        result, id="p", source="t", rollout=0, seed=0, answer="60", mode="x", config_hash="h"
    )


def test_vanilla_with_room_finishes_in_one_call(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    result = rollout(tokenizer, backend, None, clean_every=50)
    assert result.finish_reason == "stop"
    assert backend.calls == 1 and result.cleaning_rounds == 0
    assert result.response.endswith(counting_answer(TARGET))
    assert result.generated_tokens == result.final_context_tokens - result.prompt_tokens


def test_vanilla_small_context_overflows(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    result = rollout(tokenizer, backend, None, context_limit=200, max_tokens=4000)
    assert result.finish_reason == "context_overflow"
    # a request may not reach the window (SGLang's rule), so the rollout holds one token less
    assert result.final_context_tokens == 199 and result.peak_context_tokens == 199
    assert THINK_CLOSE not in result.response


def test_freelm_small_context_finishes_and_stays_small(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    cleaner = FreeModuleCleaner(backend)
    result = rollout(tokenizer, backend, cleaner, context_limit=200, max_tokens=4000, clean_every=40)
    assert result.finish_reason == "stop", result.error
    assert result.response.endswith(counting_answer(TARGET))
    assert result.cleaning_rounds >= 3
    assert result.peak_context_tokens <= 200
    assert result.generated_tokens > result.final_context_tokens - result.prompt_tokens
    for rnd in result.rounds[:-1]:
        clean = rnd.clean
        assert clean.applied == 1 and clean.skipped == [] and clean.parse_error is None
        assert clean.tokens_deleted == clean.context_tokens_before - clean.context_tokens_after > 0
    # the prefix before the first deletion is reused: the next request shares it with the last
    assert all(r.reused_tokens >= result.prompt_tokens for r in result.rounds[1:])


def test_replay_reproduces_the_final_response(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    result = rollout(tokenizer, backend, FreeModuleCleaner(backend), context_limit=300, max_tokens=4000, clean_every=30)
    record = as_record(result)
    *_, (last, before) = record.replay()
    assert before == result.response
    # the JSON line round-trips through the schema
    again = RolloutRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record


def test_malformed_and_unresolvable_cleaner_output_never_crashes(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    backend.clean_responses = deque(
        [
            "this is not json",
            '[{"prefix": "step 999\\n", "suffix": "x"}]',
            '[{"prefix": "step", "suffix": "\\n"}]',
            "[]",
        ]
    )
    result = rollout(tokenizer, backend, FreeModuleCleaner(backend), clean_every=30)
    assert result.finish_reason == "stop"
    cleans = [r.clean for r in result.rounds if r.clean is not None]
    assert cleans[0].parse_error == "no_json_list" and cleans[0].raw_output == "this is not json"
    assert cleans[1].skipped[0]["reason"] == "prefix_not_found"
    assert cleans[2].skipped[0]["reason"] == "prefix_ambiguous"
    assert cleans[3].applied == 0 and cleans[3].tokens_deleted == 0


def test_deleting_needed_state_costs_tokens_not_the_run(tokenizer):
    backend = CountingBackend(tokenizer, target=20)
    # delete everything including the last step: the counting model restarts from 0
    backend.clean_responses = deque(['[{"prefix": "step 1\\n", "suffix": "step 8\\n"}]'])
    result = rollout(tokenizer, backend, FreeModuleCleaner(backend), clean_every=24, max_clean_rounds=1)
    assert result.finish_reason == "stop"
    assert result.generated_tokens > 20 * 2


def test_max_tokens_ends_as_length(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    result = rollout(tokenizer, backend, FreeModuleCleaner(backend), context_limit=4000, max_tokens=100, clean_every=40)
    assert result.finish_reason == "length" and result.generated_tokens == 100


def test_reasoner_failure_ends_rollout_as_error_cleaner_failure_does_not(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    backend.fail_next = deque([BackendError("boom")])
    result = rollout(tokenizer, backend, None)
    assert result.finish_reason == "error" and "boom" in result.error

    reasoner = CountingBackend(tokenizer, target=TARGET)
    dead_cleaner = CountingBackend(tokenizer, target=TARGET)
    dead_cleaner.fail_next = deque([TransientBackendError("cleaner down")])
    result = rollout(tokenizer, reasoner, FreeModuleCleaner(dead_cleaner), clean_every=40)
    assert result.finish_reason == "stop"
    assert result.rounds[0].clean.error == "cleaner down"


def test_max_clean_rounds_caps_cleaning(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    result = rollout(tokenizer, backend, FreeModuleCleaner(backend), clean_every=20, max_clean_rounds=2)
    assert result.cleaning_rounds == 2 and result.finish_reason == "stop"


def test_headtail_baseline_keeps_head_and_tail(tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    cleaner = HeadTailCleaner(tokenizer, head_tokens=10, tail_tokens=20)
    result = rollout(tokenizer, backend, cleaner, clean_every=60)
    assert result.finish_reason == "stop"
    first = result.rounds[0].clean
    assert first.deleted_spans and first.tokens_deleted > 0
    assert result.response.startswith("step 1\n")


def test_config_validation():
    with pytest.raises(ValueError, match="clean_every"):
        LoopConfig(clean_every=0)


class _ByteStream:
    """Emits a fixed token stream (multi-byte characters split over byte tokens), then stops."""

    name = "bytes"

    def __init__(self, tokenizer: Tokenizer, text: str):
        self.ids = tokenizer.encode(text)
        self.tokenizer = tokenizer
        self.pos = 0

    async def generate(self, request):
        from freelm.backends.base import GenerateResult

        if request.adapter is not None:
            return GenerateResult("[]", [], "stop", 0, 0)
        out = self.ids[self.pos : self.pos + request.max_new_tokens]
        self.pos += len(out)
        done = self.pos >= len(self.ids)
        return GenerateResult(self.tokenizer.decode(out), out, "stop" if done else "length", 0, len(out))

    async def aclose(self):
        return None


def test_chunk_boundary_inside_a_multibyte_character(tokenizer):
    text = "ééé≤≤ step 1\n" * 6 + counting_answer(1)
    backend = _ByteStream(tokenizer, text)
    assert tokenizer.decode(backend.ids[:1]).endswith("\ufffd")  # "é" really is split over tokens
    result = rollout(tokenizer, backend, FreeModuleCleaner(backend), clean_every=3)
    assert result.finish_reason == "stop"
    assert result.response == text
    *_, (_, before) = as_record(result).replay()
    assert before == text


@pytest.mark.parametrize("mode", ["vanilla", "headtail"])
def test_requests_stay_inside_the_served_window(mode):
    """SGLang refuses a prompt of max_req_input_len tokens or more and caps max_new_tokens silently: with the
    window read from /server_info, running into it ends the rollout as context_overflow (vanilla) or
    cleans and goes on to the token budget (headtail), never as a rejected request."""
    tokenizer = Tokenizer(ScriptedTokenizer())
    prompt_tokens = len(tokenizer.encode(render_reasoning_prompt("Count.", tokenizer)))
    limit = prompt_tokens + 100
    with SGLangTestServer(ScriptedEngine({None: "x" * 1000}), context_length=limit) as server:

        async def main():
            backend = SGLangBackend(server.url, max_retries=0)
            cleaner = HeadTailCleaner(tokenizer, head_tokens=5, tail_tokens=5) if mode == "headtail" else None
            config = LoopConfig(clean_every=95, max_tokens=400, context_limit=limit)
            try:
                window = (await backend.server_limits()).window
                return await run_rollout(
                    "Count.", reasoner=backend, tokenizer=tokenizer, cleaner=cleaner, config=config, window=window
                )
            finally:
                await backend.aclose()

        result = run(main())
    assert result.error is None and result.peak_context_tokens == limit - 2  # max_req_len - 1
    if mode == "vanilla":
        assert result.finish_reason == "context_overflow" and result.generated_tokens == 100 - 2
    else:  # 95 tokens, cleaned to ~10, then cleaned again each time the window cuts a chunk short
        assert result.finish_reason == "length" and result.generated_tokens == 400
        assert result.cleaning_rounds >= 4


def test_no_cleaning_once_the_thinking_is_closed(tokenizer):
    """A chunk that ends by length after ``</think>`` is answer text: it is not cleaned, and the
    rest of the answer comes in one call (chunking only serves cleaning)."""
    thinking = "".join(f"step {n}\n" for n in range(1, 6))
    answer = counting_answer(5).replace("The count is done.", "The count is done. " + "step 9\n" * 30)
    text = thinking + answer
    backend = _ByteStream(tokenizer, text)
    closed_at = len(tokenizer.encode(thinking + THINK_CLOSE))
    clean_every = closed_at + 3  # the first chunk ends by length three tokens after </think>
    assert len(backend.ids) > 3 * clean_every
    calls = []

    class DeleteEverything:
        name = "delete-everything"

        async def clean(self, problem, thinking):
            from freelm.cleaners.base import CleanOutcome
            from freelm.free import remove_spans

            calls.append(thinking)
            return CleanOutcome(edit=remove_spans(thinking, [(0, len(thinking))]))

    backend_generate = backend.generate
    requests = []

    async def recording_generate(request):
        requests.append(request)
        return await backend_generate(request)

    backend.generate = recording_generate
    result = rollout(tokenizer, backend, DeleteEverything(), clean_every=clean_every)
    assert result.finish_reason == "stop" and result.response == text
    assert calls == [] and result.cleaning_rounds == 0
    assert [r.max_new_tokens for r in requests][0] == clean_every and len(requests) == 2


def test_a_prompt_far_beyond_the_window_ends_after_tokenizing_only_a_prefix(tokenizer):
    encoded: list[int] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text):
            encoded.append(len(text))
            return tokenizer.encode(text)

    backend = CountingBackend(tokenizer, target=TARGET)
    problem = "step 1\n" * 700_000  # ~5 MB
    result = asyncio.run(
        run_rollout(problem, reasoner=backend, tokenizer=Counting(), cleaner=None, config=LoopConfig(context_limit=400))
    )
    assert result.finish_reason == "context_overflow" and backend.calls == 0
    assert result.prompt_tokens >= 400 and result.generated_tokens == 0
    assert sum(encoded) < 10 * 400 * 8  # a prefix of the 5 MB prompt, never the whole of it


def test_a_long_prompt_that_fits_is_tokenized_exactly(tokenizer):
    from freelm.loop import _encode_prompt

    prompt = "step 1\n" * 1000  # 7,000 chars: tokenized whole for a 5,000-token window
    whole = tokenizer.encode(prompt)
    assert _encode_prompt(tokenizer, prompt, 5000) == whole
    prefix = _encode_prompt(tokenizer, prompt, 100)  # cannot fit a 100-token window: a prefix that fills it
    assert 100 + 64 <= len(prefix) < len(whole) and whole[: len(prefix) - 1] == prefix[:-1]


def test_a_prompt_that_fits_is_never_cut_however_many_characters_a_token_holds():
    """Runs of ``=`` or spaces are single long tokens in real vocabularies: the 8-characters-per-token probe of
    such a prompt can land just under the window, and the prompt must then be tokenized whole, not cut there."""
    from freelm.loop import _encode_prompt

    class TenCharTokens:
        def encode(self, text):
            return [len(text[i : i + 10]) for i in range(0, len(text), 10)]

    prompt = "=" * 850  # 85 tokens for a 100-token window; its 800-character probe is 80 tokens
    assert _encode_prompt(TenCharTokens(), prompt, 100) == TenCharTokens().encode(prompt)
