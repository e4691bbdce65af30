"""The loop end to end on the tiny Qwen3 + LoRA: in process, and over real HTTP with scripted faults."""

from __future__ import annotations

import asyncio
import json

from freelm.backends.base import SamplingParams
from freelm.backends.local import LocalBackend
from freelm.backends.sglang import SGLangBackend
from freelm.cleaners import FreeModuleCleaner
from freelm.loop import LoopConfig, run_rollout

PROBLEM = "What is 12 + 30?"
CONFIG = LoopConfig(clean_every=12, max_tokens=60, context_limit=512, sampling=SamplingParams.greedy())


def rollout(reasoner, tokenizer, cleaner, config=CONFIG):
    return asyncio.run(run_rollout(PROBLEM, reasoner=reasoner, tokenizer=tokenizer, cleaner=cleaner, config=config))


def test_local_loop_cleans_with_the_adapter_and_reasons_without_it(local_backend, tiny_tokenizer):
    local_backend.flush_cache()
    with_adapter = rollout(local_backend, tiny_tokenizer, FreeModuleCleaner(local_backend, max_new_tokens=24))
    assert with_adapter.finish_reason in ("stop", "length") and with_adapter.cleaning_rounds >= 2
    base_cleaner = rollout(
        local_backend, tiny_tokenizer, FreeModuleCleaner(local_backend, adapter=None, max_new_tokens=24)
    )
    raw_on = [r.clean.raw_output for r in with_adapter.rounds if r.clean]
    raw_off = [r.clean.raw_output for r in base_cleaner.rounds if r.clean]
    assert raw_on[0] != raw_off[0]  # the Free-Module LoRA really changes the cleaner
    # reasoning runs with the adapter off: vanilla (no cleaner) generates exactly the first chunk's tokens
    vanilla = rollout(local_backend, tiny_tokenizer, None)
    assert vanilla.response.startswith(with_adapter.rounds[0].generated_text)


def test_kv_reuse_across_rounds_gives_the_same_rollout_as_full_prefill(tiny_model_dir, local_backend, tiny_tokenizer):
    local_backend.flush_cache()
    reused = rollout(local_backend, tiny_tokenizer, FreeModuleCleaner(local_backend, max_new_tokens=24))
    assert any((r.cached_tokens or 0) > 0 for r in reused.rounds[1:])
    no_cache = LocalBackend(local_backend.model, tiny_tokenizer, cache_size=0)
    fresh = rollout(no_cache, tiny_tokenizer, FreeModuleCleaner(no_cache, max_new_tokens=24))
    assert all(not r.cached_tokens for r in fresh.rounds)
    assert fresh.response == reused.response
    assert [r.generated_text for r in fresh.rounds] == [r.generated_text for r in reused.rounds]


def over_http(server, scenario):
    """Run ``scenario(backend)`` on one event loop (an httpx client is bound to the loop that made it)."""

    async def main():
        backend = SGLangBackend(server.url, timeout=5, max_retries=3, backoff=0.01)
        try:
            return await scenario(backend)
        finally:
            await backend.aclose()

    return asyncio.run(main())


def arollout(backend, tokenizer, cleaner, config=CONFIG):
    return run_rollout(PROBLEM, reasoner=backend, tokenizer=tokenizer, cleaner=cleaner, config=config)


def test_http_faults_cost_retries_not_results(local_sglang_server, local_backend, tiny_tokenizer):
    server = local_sglang_server

    async def scenario(backend):
        clean = await arollout(backend, tiny_tokenizer, FreeModuleCleaner(backend, max_new_tokens=24))
        server.reset()
        local_backend.flush_cache()
        server.fail_next(503)
        server.drop_next()
        server.delay_next(8.0)  # past the client's 5 s timeout: retried
        faulty = await arollout(backend, tiny_tokenizer, FreeModuleCleaner(backend, max_new_tokens=24))
        return clean, faulty

    clean, faulty = over_http(server, scenario)
    calls = len(faulty.rounds) + faulty.cleaning_rounds
    assert server.requests["/generate"] == calls + 3  # each fault cost exactly one retried request
    assert faulty.finish_reason == clean.finish_reason != "error"
    assert faulty.response == clean.response
    assert [r.clean.raw_output for r in faulty.rounds if r.clean] == [
        r.clean.raw_output for r in clean.rounds if r.clean
    ]


def test_http_bad_cleaner_output_is_recorded_and_reasoning_goes_on(local_sglang_server, tiny_tokenizer):
    server = local_sglang_server
    # nothing gets deleted below, so the thinking at the third cleaning is the first 36 vanilla tokens
    config36 = LoopConfig(clean_every=12, max_tokens=36, context_limit=512, sampling=SamplingParams.greedy())

    async def scenario(backend):
        thinking = (await arollout(backend, tiny_tokenizer, None, config36)).response
        repeated = next(ch for ch in sorted(set(thinking)) if thinking.count(ch) >= 2)
        server.override_next_adapter_output('```json\n[{"prefix": oops')  # malformed
        server.override_next_adapter_output('[{"prefix": "never written", "suffix": "."}]')  # anchor not found
        server.override_next_adapter_output(json.dumps([{"prefix": repeated, "suffix": repeated}]))  # ambiguous
        return await arollout(backend, tiny_tokenizer, FreeModuleCleaner(backend, max_new_tokens=24))

    result = over_http(server, scenario)
    assert result.finish_reason != "error"
    cleans = [r.clean for r in result.rounds if r.clean]
    assert cleans[0].parse_error == "no_json_list" and cleans[0].tokens_deleted == 0
    assert cleans[1].skipped[0]["reason"] == "prefix_not_found"
    assert cleans[2].skipped[0]["reason"] == "prefix_ambiguous" and cleans[2].tokens_deleted == 0
    assert result.rounds[3].prompt_tokens == result.rounds[2].context_tokens  # reasoning resumed on the same context
