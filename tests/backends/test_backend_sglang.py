"""SGLangBackend over real HTTP on 127.0.0.1: request mapping, adapters, cache reporting, retries, errors."""

from __future__ import annotations

import asyncio
import socket
from functools import partial

import pytest
from backend_calls import call, scripted_server_fixture

import freelm.backends.sglang as sglang_mod
from freelm.backends.base import BackendError, GenerateRequest, SamplingParams, TransientBackendError
from freelm.backends.sglang import (
    TOP_K_ALL,
    SGLangBackend,
    generate_payload,
    parse_generate_response,
    parse_server_info,
)
from freelm.testing.sglang_protocol import SAMPLING_KEYS

GREEDY = SamplingParams.greedy()


run = partial(call, SGLangBackend)


scripted_server = scripted_server_fixture({None: "step 1\nstep 2\n", "free": "[]"})


@pytest.fixture
def scripted(scripted_server):
    scripted_server.reset()
    return scripted_server


def test_payload_sends_only_sglang_sampling_keys():
    req = GenerateRequest(max_new_tokens=7, input_ids=[1, 2], stop=["</think>"], seed=3, adapter="free")
    body = generate_payload(req)
    assert set(body["sampling_params"]) <= set(SAMPLING_KEYS)
    assert body["sampling_params"]["sampling_seed"] == 3 and body["lora_path"] == "free"
    assert body["sampling_params"]["skip_special_tokens"] is False and body["sampling_params"]["no_stop_trim"] is True
    base = generate_payload(GenerateRequest(max_new_tokens=1, text="hi", sampling=GREEDY))
    assert "lora_path" not in base and "input_ids" not in base and base["text"] == "hi"
    assert base["sampling_params"]["top_k"] == TOP_K_ALL and "sampling_seed" not in base["sampling_params"]


def test_adapter_on_and_off_over_http(local_sglang_server, free_example):
    async def go(backend):
        on = await backend.generate(
            GenerateRequest(64, input_ids=free_example.prompt_ids, sampling=GREEDY, adapter="free")
        )
        off = await backend.generate(GenerateRequest(64, input_ids=free_example.prompt_ids, sampling=GREEDY))
        by_text = await backend.generate(GenerateRequest(64, text=free_example.prompt, sampling=GREEDY, adapter="free"))
        return on, off, by_text

    on, off, by_text = run(go, local_sglang_server.url)
    assert on.output_ids == free_example.target_ids and on.text == free_example.target + "<|im_end|>"
    assert on.finish_reason == "stop" and on.endpoint == local_sglang_server.url and on.latency_s > 0
    assert off.output_ids != free_example.target_ids
    assert by_text.output_ids == free_example.target_ids
    assert by_text.cached_tokens == len(free_example.prompt_ids) - 1  # same namespace, same prompt
    assert local_sglang_server.adapter_requests == {"free": 2, None: 1}


def test_prefix_reuse_over_http_matches_full_prefill(local_sglang_server, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("Let me think. First, compute the sum: 12 + 30 = 42.")

    async def go(backend):
        first = await backend.generate(GenerateRequest(12, input_ids=prompt, sampling=GREEDY))
        longer = prompt + first.output_ids
        reused = await backend.generate(GenerateRequest(12, input_ids=longer, sampling=GREEDY))
        await backend.flush_cache()
        fresh = await backend.generate(GenerateRequest(12, input_ids=longer, sampling=GREEDY))
        return longer, reused, fresh

    longer, reused, fresh = run(go, local_sglang_server.url)
    assert reused.cached_tokens == len(longer) - 1 and fresh.cached_tokens == 0
    assert reused.output_ids == fresh.output_ids


def test_unknown_adapter_is_a_400_backend_error_without_retry(local_sglang_server, free_example):
    req = GenerateRequest(4, input_ids=free_example.prompt_ids, adapter="ghost")
    with pytest.raises(BackendError, match="HTTP 400: Got LoRA adapter that has never been loaded") as info:
        run(lambda b: b.generate(req), local_sglang_server.url, backoff=0.01)
    assert not isinstance(info.value, TransientBackendError)
    assert local_sglang_server.requests["/generate"] == 1


def test_unknown_sampling_key_is_a_400_naming_the_key(scripted, monkeypatch):
    def with_typo(request):
        body = generate_payload(request)
        body["sampling_params"]["top_kk"] = 5
        return body

    monkeypatch.setattr(sglang_mod, "generate_payload", with_typo)
    with pytest.raises(BackendError, match="HTTP 400: unknown field `top_kk`"):
        run(lambda b: b.generate(GenerateRequest(4, text="x")), scripted.url, backoff=0.01)
    assert scripted.requests["/generate"] == 1


def test_retries_5xx_and_dropped_connections_then_succeeds(scripted):
    scripted.fail_next(503, times=2)
    scripted.drop_next(times=1)
    res = run(lambda b: b.generate(GenerateRequest(64, text="q")), scripted.url, max_retries=3, backoff=0.01)
    assert res.text == "step 1\nstep 2\n<|im_end|>" and res.finish_reason == "stop"
    assert scripted.requests["/generate"] == 4


def test_exhausted_retries_raise_transient_with_server_message(scripted):
    scripted.fail_next(502, message="upstream exploded", times=5)
    with pytest.raises(TransientBackendError, match="3 attempts: HTTP 502: upstream exploded"):
        run(lambda b: b.generate(GenerateRequest(4, text="q")), scripted.url, max_retries=2, backoff=0.01)
    assert scripted.requests["/generate"] == 3


def test_timeout_raises_transient_after_retries(scripted):
    scripted.delay_next(1.0, times=2)
    with pytest.raises(TransientBackendError, match="timeout"):
        run(lambda b: b.generate(GenerateRequest(4, text="q")), scripted.url, timeout=0.3, max_retries=1, backoff=0.01)
    assert scripted.requests["/generate"] == 2


def test_connection_refused_is_transient():
    with socket.socket() as s:  # a port nobody listens on: bind, read it, close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientBackendError, match="connection error"):
        run(lambda b: b.generate(GenerateRequest(4, text="q")), f"http://127.0.0.1:{port}", max_retries=1, backoff=0.01)


def test_abort_finish_and_malformed_responses_are_backend_errors():
    abort = {
        "text": "",
        "output_ids": [],
        "meta_info": {"finish_reason": {"type": "abort", "message": "OOM", "status_code": 500}},
    }
    with pytest.raises(BackendError, match="aborted.*OOM"):
        parse_generate_response(abort, "http://x")
    with pytest.raises(BackendError, match="aborted"):
        parse_generate_response({"meta_info": {"finish_reason": "abort"}}, "http://x")
    with pytest.raises(BackendError, match="no meta_info"):
        parse_generate_response({"text": "hi"}, "http://x")
    with pytest.raises(BackendError, match="malformed"):
        parse_generate_response({"meta_info": {"finish_reason": {"type": "stop"}}}, "http://x")


INFO = {"context_length": 1000, "max_req_input_len": 994}


@pytest.mark.parametrize(
    ("extra", "max_input", "max_total"),
    [
        ({}, 993, 998),  # max_req_len 999: prompts below max_req_input_len, requests below max_req_len
        ({"max_req_input_len": 500}, 499, 504),  # a KV pool smaller than the context: max_req_len 505
        # EAGLE keeps its drafts in output slots (managers/utils.py: compute_num_reserved_tokens): max(16, 4 x 3)
        ({"speculative_algorithm": "EAGLE3", "speculative_eagle_topk": 4, "speculative_num_steps": 3,
          "speculative_num_draft_tokens": 16}, 1000 - 1 - 16, 1000 - 16),
        ({"speculative_algorithm": "EAGLE", "speculative_eagle_topk": 8, "speculative_num_steps": 4,
          "speculative_num_draft_tokens": 16}, 1000 - 1 - 32, 1000 - 32),
        ({"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 16}, 993, 998),  # not EAGLE: no slots
    ],
)  # fmt: skip
def test_server_info_window_counts_the_kv_pool_and_eagle_draft_slots(extra, max_input, max_total):
    """tokenizer_manager.py refuses ``input + reserved >= context_len`` and ``input + reserved + max_new >
    context_len``; the scheduler refuses ``input >= max_req_input_len`` and caps at ``max_req_len - input - 1``."""
    window = parse_server_info({**INFO, **extra}, "http://h").window
    assert [window.room(p) for p in (max_input, max_input + 1)] == [max_total - max_input, 0]
    assert window.room(0) == max_total and window.source == "http://h/server_info"


def test_health_model_info_and_dynamic_adapter_load(local_sglang_server, free_adapter_dir, free_example):
    async def go(backend):
        healthy = await backend.health()
        info = await backend.model_info()
        load = await backend.load_adapter("fresh", str(free_adapter_dir))
        res = await backend.generate(
            GenerateRequest(64, input_ids=free_example.prompt_ids, sampling=GREEDY, adapter="fresh")
        )
        unload = await backend.unload_adapter("fresh")
        with pytest.raises(BackendError, match="HTTP 400: .*does not exist"):
            await backend.unload_adapter("fresh")
        return healthy, info, load, res, unload

    healthy, info, load, res, unload = run(go, local_sglang_server.url)
    assert healthy and info["served_model_name"] == "tiny" and info["is_generation"] is True
    assert load["success"] and "fresh" in load["loaded_adapters"]
    assert res.output_ids == free_example.target_ids
    assert unload["success"] and "fresh" not in unload["loaded_adapters"]


def test_make_backend_by_kind():
    from freelm.backends import Backend, make_backend

    backend = make_backend("sglang", base_url="http://127.0.0.1:9")
    assert isinstance(backend, SGLangBackend) and isinstance(backend, Backend)
    asyncio.run(backend.aclose())
    with pytest.raises(ValueError, match="unknown backend kind 'tgi'"):
        make_backend("tgi")
