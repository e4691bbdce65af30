"""LocalBackend: adapter on/off, KV prefix reuse equal to full re-prefill, sampling, stops, concurrency."""

from __future__ import annotations

import asyncio

import pytest

from freelm.backends.base import BackendError, GenerateRequest, SamplingParams
from freelm.free import apply_deletions, parse_commands

GREEDY = SamplingParams.greedy()


def greedy(ids, n=24, adapter=None, **kw) -> GenerateRequest:
    return GenerateRequest(max_new_tokens=n, input_ids=list(ids), sampling=GREEDY, adapter=adapter, **kw)


def test_adapter_on_emits_the_target_json_and_off_does_not(local_backend, free_example):
    local_backend.flush_cache()
    on = local_backend.generate_blocking(greedy(free_example.prompt_ids, 64, adapter="free"))
    assert on.output_ids == free_example.target_ids
    assert on.finish_reason == "stop"
    assert on.text == free_example.target + "<|im_end|>"  # specials kept, eos not trimmed
    edit = apply_deletions(free_example.thinking, parse_commands(on.text.removesuffix("<|im_end|>")))
    assert "Wait, check again." not in edit.text and len(edit.applied) == 1
    off = local_backend.generate_blocking(greedy(free_example.prompt_ids, 64))
    assert off.output_ids != free_example.target_ids


def test_kv_reuse_equals_full_prefill_and_reports_cached_tokens(local_backend, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("Let me think. First, compute the sum: 12 + 30 = 42.")
    local_backend.flush_cache()
    first = local_backend.generate_blocking(greedy(prompt, 16))
    assert first.cached_tokens == 0
    # continue the sequence: everything but the last prompt token is served from the cache
    longer = prompt + first.output_ids
    reused = local_backend.generate_blocking(greedy(longer, 16))
    assert reused.cached_tokens == len(longer) - 1
    # a middle deletion: only the common prefix is reused (as SGLang's radix cache does)
    edited = prompt[:5] + longer[8:]
    partial = local_backend.generate_blocking(greedy(edited, 16))
    assert partial.cached_tokens == 5
    local_backend.flush_cache()
    fresh_longer = local_backend.generate_blocking(greedy(longer, 16))
    local_backend.flush_cache()
    fresh_edited = local_backend.generate_blocking(greedy(edited, 16))
    assert fresh_longer.cached_tokens == 0 and fresh_edited.cached_tokens == 0
    assert reused.output_ids == fresh_longer.output_ids
    assert partial.output_ids == fresh_edited.output_ids


def test_base_and_adapter_never_share_kv(local_backend, free_example):
    local_backend.flush_cache()
    local_backend.generate_blocking(greedy(free_example.prompt_ids, 4))
    cleaned = local_backend.generate_blocking(greedy(free_example.prompt_ids, 64, adapter="free"))
    assert cleaned.cached_tokens == 0
    assert cleaned.output_ids == free_example.target_ids
    again = local_backend.generate_blocking(greedy(free_example.prompt_ids, 64, adapter="free"))
    assert again.cached_tokens == len(free_example.prompt_ids) - 1
    assert again.output_ids == free_example.target_ids


def test_unknown_adapter_is_a_backend_error(local_backend, free_example):
    with pytest.raises(BackendError, match="never been loaded"):
        local_backend.generate_blocking(greedy(free_example.prompt_ids, 4, adapter="nope"))


def test_length_and_stop_string(local_backend, free_example):
    res = local_backend.generate_blocking(greedy(free_example.prompt_ids, 5, adapter="free"))
    assert res.finish_reason == "length" and res.completion_tokens == 5 == len(res.output_ids)
    stopped = local_backend.generate_blocking(greedy(free_example.prompt_ids, 64, adapter="free", stop=['"suffix"']))
    assert stopped.finish_reason == "stop"
    # no_stop_trim semantics: decoding stops at the token completing the stop string, which is kept
    assert '"suffix"' in stopped.text and '"suffix"' not in local_backend.decode(stopped.output_ids[:-1])
    assert free_example.target.startswith(stopped.text)


def test_seeded_sampling_is_reproducible(local_backend, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The quick brown fox")
    sampling = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, min_p=0.01)
    runs = [
        local_backend.generate_blocking(GenerateRequest(max_new_tokens=12, input_ids=prompt, sampling=sampling, seed=s))
        for s in (7, 7, 8)
    ]
    assert runs[0].output_ids == runs[1].output_ids
    assert runs[0].output_ids != runs[2].output_ids


def test_text_prompt_and_concurrent_async_calls(local_backend, tiny_tokenizer, free_example):
    async def main():
        reqs = [GenerateRequest(max_new_tokens=64, text=free_example.prompt, sampling=GREEDY, adapter="free")] * 3
        reqs.append(greedy(tiny_tokenizer.encode("Let me think."), 8))
        return await asyncio.gather(*(local_backend.generate(r) for r in reqs))

    results = asyncio.run(main())
    assert [r.output_ids for r in results[:3]] == [free_example.target_ids] * 3
    assert results[3].completion_tokens == 8


def test_load_and_unload_adapter(local_backend, free_adapter_dir, free_example):
    local_backend.load_adapter("free2", free_adapter_dir)
    try:
        res = local_backend.generate_blocking(greedy(free_example.prompt_ids, 64, adapter="free2"))
        assert res.output_ids == free_example.target_ids
        with pytest.raises(BackendError, match="already loaded"):
            local_backend.load_adapter("free2", free_adapter_dir)
    finally:
        local_backend.unload_adapter("free2")
    assert "free2" not in local_backend.adapter_names
    with pytest.raises(BackendError):
        local_backend.generate_blocking(greedy(free_example.prompt_ids, 4, adapter="free2"))


def test_prompt_at_the_context_length_is_rejected(local_backend):
    too_long = [5] * local_backend.context_length
    with pytest.raises(BackendError, match="context length"):
        local_backend.generate_blocking(greedy(too_long, 4))
