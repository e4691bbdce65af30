"""The SGLang-protocol test server: validation as SGLang does it, response shapes, faults, counters, concurrency."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from freelm.backends.base import GenerateRequest
from freelm.backends.sglang import SGLangBackend
from freelm.testing.sglang_server import ScriptedEngine, SGLangTestServer, parse_model_adapter


@pytest.fixture
def server():
    engine = ScriptedEngine({None: "a</think>b", "free": '[{"prefix": "a", "suffix": "b"}]'})
    with SGLangTestServer(engine, served_model_name="qwen3-8b") as srv:
        yield srv


def post(srv, path, body):
    return httpx.post(srv.url + path, json=body, timeout=10)


def test_generate_response_has_sglangs_shape(server):
    r = post(server, "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 64}})
    assert r.status_code == 200
    data = r.json()
    assert set(data) == {"text", "output_ids", "meta_info"}
    meta = data["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"} <= set(meta)
    assert meta["finish_reason"] == {"type": "stop", "matched": ScriptedEngine.EOS_ID}
    # SGLang defaults: the matched eos is trimmed; "</think>" is an ordinary string for this engine
    assert data["text"] == "a</think>b"
    raw = {"no_stop_trim": True, "skip_special_tokens": False}
    assert post(server, "/generate", {"text": "hi", "sampling_params": raw}).json()["text"] == "a</think>b<|im_end|>"
    kept = post(server, "/generate", {"text": "hi", "sampling_params": {"no_stop_trim": True, "stop": ["</think>"]}})
    assert kept.json()["text"] == "a</think>"
    cut = post(server, "/generate", {"text": "hi", "sampling_params": {"stop": ["</think>"]}}).json()
    assert cut["text"] == "a"
    short = post(server, "/generate", {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}).json()
    assert short["meta_info"]["finish_reason"] == {"type": "length", "length": 2} and short["text"] == "a<"


def test_validation_matches_sglang(server):
    both = post(server, "/generate", {"text": "x", "input_ids": [1]})
    neither = post(server, "/generate", {"sampling_params": {}})
    assert both.status_code == neither.status_code == 400
    assert "Either text or input_ids" in both.json()["error"]["message"]
    typo = post(server, "/generate", {"text": "x", "sampling_params": {"max_tokens": 3}})
    assert typo.status_code == 400 and typo.json()["error"]["message"].startswith("unknown field `max_tokens`")
    ghost = post(server, "/generate", {"text": "x", "lora_path": "ghost"})
    assert ghost.status_code == 400
    assert "Got LoRA adapter that has never been loaded" in ghost.json()["error"]["message"]
    bad_topk = post(server, "/generate", {"text": "x", "sampling_params": {"top_k": 0}})
    assert bad_topk.status_code == 400
    assert post(server, "/generate", {"text": "x", "sampling_params": {"top_k": 1 << 30}}).status_code == 200
    assert server.requests["/generate"] == 6


def test_openai_model_parsing_and_models_list(server):
    assert parse_model_adapter("qwen3-8b", "qwen3-8b") is None
    assert parse_model_adapter("qwen3-8b:free", "qwen3-8b") == "free"
    assert parse_model_adapter("other", "qwen3-8b") is None
    assert parse_model_adapter("org/model:free", "qwen3-8b") == "free"
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["qwen3-8b", "qwen3-8b:free"] and cards[1]["parent"] == "qwen3-8b"
    r = post(server, "/v1/completions", {"model": "qwen3-8b:free", "prompt": [3, 4], "max_tokens": 64})
    body = r.json()
    assert body["choices"][0]["text"] == '[{"prefix": "a", "suffix": "b"}]' and body["usage"]["prompt_tokens"] == 2
    ghost = post(server, "/v1/completions", {"model": "qwen3-8b:ghost", "prompt": "x"})
    assert ghost.status_code == 400 and ghost.json()["object"] == "error"


def test_dynamic_adapter_load_unload_and_flush(server):
    assert post(server, "/generate", {"text": "x", "lora_path": "v2"}).status_code == 400
    loaded = post(server, "/load_lora_adapter", {"lora_name": "v2", "lora_path": "/ckpt/v2"}).json()
    assert loaded["success"] and loaded["loaded_adapters"]["v2"] == "/ckpt/v2"
    assert post(server, "/generate", {"text": "x", "lora_path": "v2"}).status_code == 200
    assert post(server, "/unload_lora_adapter", {"lora_name": "v2"}).json()["success"]
    assert post(server, "/unload_lora_adapter", {"lora_name": "v2"}).status_code == 400
    assert post(server, "/flush_cache", {}).status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200 == httpx.get(server.url + "/health").status_code


def test_cached_tokens_follow_the_longest_common_prefix_per_adapter(server):
    def cached(body):
        return post(server, "/generate", body).json()["meta_info"]["cached_tokens"]

    assert cached({"input_ids": [1, 2, 3, 4]}) == 0
    assert cached({"input_ids": [1, 2, 3, 9, 9]}) == 3
    assert cached({"input_ids": [1, 2, 3, 4], "lora_path": "free"}) == 0  # separate namespace


def test_adapter_override_applies_to_the_next_adapter_call_only(server):
    server.override_next_adapter_output("not json at all")
    base = post(server, "/generate", {"text": "x"}).json()
    cleaned = post(server, "/generate", {"text": "x", "lora_path": "free"}).json()
    normal = post(server, "/generate", {"text": "x", "lora_path": "free"}).json()
    assert base["text"] == "a</think>b"
    assert cleaned["text"] == "not json at all"
    assert normal["text"] == '[{"prefix": "a", "suffix": "b"}]'


def test_256_concurrent_requests_are_all_in_flight_at_once(server):
    """Every request blocks until all 256 have arrived: that completes only if none is serialised behind another."""
    barrier = threading.Barrier(256, timeout=120)

    def wait_for_all(request):
        barrier.wait()
        return "a</think>b"

    server.engine.outputs[None] = wait_for_all

    async def main():
        backend = SGLangBackend(server.url, timeout=150, max_retries=0)
        try:
            return await asyncio.gather(*(backend.generate(GenerateRequest(64, text=f"p{i}")) for i in range(256)))
        finally:
            await backend.aclose()

    results = asyncio.run(main())
    assert len(results) == 256 and all(r.finish_reason == "stop" for r in results)
    assert server.max_in_flight == 256
