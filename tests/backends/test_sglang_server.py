"""The SGLang-protocol stand-in: one test per SGLang 0.5.23 rule it applies (docs/backends.md has the table)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from freelm.backends.base import GenerateRequest, GenerateResult, SamplingParams
from freelm.backends.sglang import SGLangBackend
from freelm.testing.engines import ScriptedEngine
from freelm.testing.radix_cache import RadixCache
from freelm.testing.sglang_faults import Fault, FaultQueue
from freelm.testing.sglang_protocol import parse_model_adapter, shape_output
from freelm.testing.sglang_server import SGLangTestServer

EOS = ScriptedEngine.EOS_ID


@pytest.fixture
def server():
    engine = ScriptedEngine({None: "a</think>b", "free": '[{"prefix": "a", "suffix": "b"}]'})
    with SGLangTestServer(engine, served_model_name="qwen3-8b") as srv:
        yield srv


def post(srv, path, body):
    return httpx.post(srv.url + path, json=body, timeout=10)


def generate(srv, **body):
    return post(srv, "/generate", body)


# ----- request validation (api/v1/api_types.py, managers/io_struct.py, managers/tokenizer_manager.py)


def test_contract_violations_are_a_bare_error_string(server):
    typo = generate(server, text="x", sampling_params={"max_tokens": 3})
    assert typo.status_code == 400 and typo.json()["error"].startswith("unknown field `max_tokens`, expected one of")
    wrong_type = generate(server, text="x", sampling_params={"temperature": "hot"})
    assert wrong_type.status_code == 400 and isinstance(wrong_type.json()["error"], str)


def test_prompt_fields_neither_is_a_value_error_and_input_ids_win_over_text(server):
    neither = generate(server, sampling_params={})
    assert neither.status_code == 400
    assert neither.json() == {"error": {"message": "Either text, input_ids or input_embeds should be provided."}}
    both = generate(server, text="a much longer text prompt", input_ids=[5, 6])
    assert both.status_code == 200 and both.json()["meta_info"]["prompt_tokens"] == 2


def test_sampling_values_are_verified(server):
    assert generate(server, text="x", sampling_params={"top_k": 0}).status_code == 400
    assert generate(server, text="x", sampling_params={"top_p": 0}).status_code == 400
    assert generate(server, text="x", sampling_params={"top_k": 1 << 30}).status_code == 200


def test_unknown_adapter_is_a_value_error(server):
    ghost = generate(server, text="x", lora_path="ghost")
    assert ghost.status_code == 400
    assert ghost.json()["error"]["message"].startswith("Got LoRA adapter that has never been loaded: ghost")


# ----- the window (managers/tokenizer_manager.py, managers/tp_worker.py, managers/scheduler.py)


def test_tokenizer_manager_window_refuses_long_inputs_and_totals_past_the_context():
    with SGLangTestServer(ScriptedEngine({None: "y" * 500}), context_length=100, kv_capacity=10_000) as srv:
        long = generate(srv, input_ids=[5] * 100, sampling_params={"max_new_tokens": 1})
        assert long.status_code == 400 and "is longer than the model's context length (100" in long.text
        over = generate(srv, input_ids=[5] * 10, sampling_params={"max_new_tokens": 91})
        assert over.status_code == 400 and "You requested a total of 101 tokens" in over.json()["error"]["message"]
        exact = generate(srv, input_ids=[5] * 10, sampling_params={"max_new_tokens": 90})  # ">" not ">="
        assert exact.status_code == 200


def test_scheduler_caps_max_new_tokens_and_refuses_inputs_at_max_req_input_len():
    with SGLangTestServer(ScriptedEngine({None: "y" * 500}), context_length=100, kv_capacity=60) as srv:
        # max_req_len = min(100 - 1, 60 - 1) = 59, max_req_input_len = 54
        assert srv.server_info()["max_req_input_len"] == 54
        capped = generate(srv, input_ids=[5] * 10, sampling_params={"max_new_tokens": 80}).json()
        assert capped["meta_info"]["completion_tokens"] == 59 - 10 - 1
        assert capped["meta_info"]["finish_reason"] == {"type": "length", "length": 48}
        refused = generate(srv, input_ids=[5] * 54, sampling_params={"max_new_tokens": 1})
        assert refused.status_code == 400
        assert "Input length (54 tokens) exceeds the maximum allowed length (54 tokens)" in refused.text
        assert generate(srv, input_ids=[5] * 53, sampling_params={"max_new_tokens": 1}).status_code == 200


def test_server_info_reports_the_window_and_the_client_reads_it_exactly():
    with SGLangTestServer(ScriptedEngine({None: "y" * 500}), context_length=400) as srv:
        info = httpx.get(srv.url + "/server_info").json()
        assert info["context_length"] == 400 and info["max_req_input_len"] == 394
        assert info["enable_deterministic_inference"] is False and info["enable_cache_report"] is False

        async def limits():
            backend = SGLangBackend(srv.url)
            try:
                return await backend.server_limits()
            finally:
                await backend.aclose()

        window = asyncio.run(limits()).window
        assert (window.max_input, window.max_total) == (393, 398)
        for n in (10, 200, 393):  # every size the window allows is served in full ...
            full = generate(srv, input_ids=[5] * n, sampling_params={"max_new_tokens": window.room(n)}).json()
            assert full["meta_info"]["completion_tokens"] == window.room(n)
        more = generate(srv, input_ids=[5] * 10, sampling_params={"max_new_tokens": window.room(10) + 1}).json()
        assert more["meta_info"]["completion_tokens"] == window.room(10)  # ... one more is silently capped
        assert generate(srv, input_ids=[5] * 394, sampling_params={"max_new_tokens": 1}).status_code == 400


# ----- seeds (sampling/sampling_batch_info.py, layers/sampler.py)


def _engine_seed(srv, **params):
    generate(srv, text="x", sampling_params={"temperature": 0.7, **params})
    return srv.engine_requests[-1].seed


def test_seeds_are_ignored_without_deterministic_inference(server):
    assert _engine_seed(server, sampling_seed=7) is None


def test_deterministic_inference_applies_seeds_defaults_to_42_and_dies_on_min_p():
    with SGLangTestServer(ScriptedEngine(), deterministic=True) as srv:
        assert _engine_seed(srv, sampling_seed=7) == 7
        assert _engine_seed(srv) == 42
        crash = generate(srv, text="x", sampling_params={"temperature": 0.7, "min_p": 0.05, "sampling_seed": 1})
        assert crash.status_code == 500 and "AssertionError" in crash.text
        assert httpx.get(srv.url + "/health").status_code == 503


# ----- output shaping (managers/schedule_batch.py, managers/detokenizer_manager.py)


def test_finish_reason_matched_is_the_token_id_or_the_stop_string(server):
    eos = generate(server, text="hi").json()
    assert eos["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    stop = generate(server, text="hi", sampling_params={"stop": ["</think>"]}).json()
    assert stop["meta_info"]["finish_reason"] == {"type": "stop", "matched": "</think>"}
    short = generate(server, input_ids=[5, 6], sampling_params={"max_new_tokens": 2}).json()
    assert short["meta_info"]["finish_reason"] == {"type": "length", "length": 2} and short["text"] == "a<"


def test_stop_trimming_and_special_tokens(server):
    assert generate(server, text="hi").json()["text"] == "a</think>b"  # eos dropped, specials skipped
    raw = {"no_stop_trim": True, "skip_special_tokens": False}
    assert generate(server, text="hi", sampling_params=raw).json()["text"] == "a</think>b<|im_end|>"
    kept = generate(server, text="hi", sampling_params={"no_stop_trim": True, "stop": ["</think>"]}).json()
    assert kept["text"] == "a</think>" and kept["output_ids"][-1] != EOS
    assert generate(server, text="hi", sampling_params={"stop": ["</think>"]}).json()["text"] == "a"


def test_text_ends_at_the_stop_string_even_when_output_ids_run_past_it():
    """A last token can hold characters after the stop string: ``text`` stops there, ``output_ids`` do not."""
    engine = ScriptedEngine()
    ids = engine.encode("abc STOP tail")  # as if "P tail" were one token sampled last
    result = GenerateResult(text="", output_ids=ids, finish_reason="stop", prompt_tokens=1, completion_tokens=len(ids))
    request = GenerateRequest(64, text="x", stop=["STOP"])
    assert shape_output(result, request, engine, True, True) == ("abc STOP", {"type": "stop", "matched": "STOP"})
    assert shape_output(result, request, engine, True, False)[0] == "abc "


# ----- the prefix cache (mem_cache/radix_cache.py, mem_cache/common.py)


def test_cache_holds_prompt_and_output_per_adapter(server):
    def cached(**body):
        return generate(server, **body).json()["meta_info"]["cached_tokens"]

    assert cached(input_ids=[3, 4, 5, 6]) == 0
    output = generate(server, input_ids=[7, 8]).json()["output_ids"]
    follow_up = [7, 8, *output, 9]
    assert cached(input_ids=follow_up) == 2 + len(output) - 1  # prompt + output less the eos (no KV for it)
    assert cached(input_ids=[3, 4, 5, 9, 9]) == 3
    assert cached(input_ids=[3, 4, 5, 6], lora_path="free") == 0  # the adapter's own tree
    assert cached(input_ids=[3, 4, 5, 6]) == 3  # capped at input - 1
    assert post(server, "/flush_cache", {}).status_code == 200
    assert cached(input_ids=[3, 4, 5, 6]) == 0


def test_radix_cache_evicts_least_recently_used_leaves_within_its_token_budget():
    cache = RadixCache(capacity=10)
    cache.insert(None, [1, 2, 3, 4, 5, 6])
    cache.insert(None, [1, 2, 3, 7, 8])  # shares [1, 2, 3]: 8 tokens held
    assert cache.size == 8 and cache.match(None, [1, 2, 3, 4, 5, 6, 0]) == 6  # touches the 4-5-6 branch
    cache.insert(None, [9, 9, 9])  # 11 > 10: the least recently used leaf (7, 8) goes
    assert cache.size == 9
    assert cache.match(None, [1, 2, 3, 7, 8, 0]) == 3 and cache.match(None, [1, 2, 3, 4, 5, 6, 0]) == 6
    assert cache.match("adapter", [1, 2, 3, 0]) == 0


# ----- LoRA registry (managers/tokenizer_control_mixin.py, lora/lora_registry.py, lora/lora_manager.py)


def test_adapter_load_unload_bodies_and_implicit_reload(server):
    assert generate(server, text="x", lora_path="v2").status_code == 400
    loaded = post(server, "/load_lora_adapter", {"lora_name": "v2", "lora_path": "/ckpt/v2"}).json()
    assert loaded["success"] and loaded["loaded_adapters"]["v2"] == "/ckpt/v2"
    again = post(server, "/load_lora_adapter", {"lora_name": "v2", "lora_path": "/ckpt/v2"})
    assert again.status_code == 400 and again.json()["success"] is False and "already loaded" in again.text
    prompt = [3, 4, 5, 6]
    assert generate(server, input_ids=prompt, lora_path="v2").status_code == 200
    assert post(server, "/unload_lora_adapter", {"lora_name": "v2"}).json()["success"]
    missing = post(server, "/unload_lora_adapter", {"lora_name": "v2"})
    assert missing.status_code == 400 and missing.json()["error_message"].startswith("LoRA with name v2 does not exist")
    # the name stays known: a request reloads it (a fresh lora_id, so an empty cache)
    reloaded = generate(server, input_ids=prompt, lora_path="v2")
    assert reloaded.status_code == 200 and reloaded.json()["meta_info"]["cached_tokens"] == 0
    assert "v2" in server.adapter_paths


# ----- the OpenAI route (entrypoints/http_server.py, entrypoints/openai/*)


def test_models_list_adapters_under_their_lora_name(server):
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == ["qwen3-8b", "free"]
    assert cards[0]["max_model_len"] == server.context_length and cards[1]["parent"] == "qwen3-8b"


def test_openai_model_parsing_and_error_body(server):
    assert parse_model_adapter("qwen3-8b", "qwen3-8b") is None
    assert parse_model_adapter("qwen3-8b:free", "qwen3-8b") == "free"
    assert parse_model_adapter("other", "qwen3-8b") is None  # a bare unknown name is the base model
    assert parse_model_adapter("org/model:free", "qwen3-8b") == "free"
    body = post(server, "/v1/completions", {"model": "qwen3-8b:free", "prompt": [3, 4], "max_tokens": 64}).json()
    assert body["choices"][0]["text"] == '[{"prefix": "a", "suffix": "b"}]' and body["usage"]["prompt_tokens"] == 2
    ghost = post(server, "/v1/completions", {"model": "qwen3-8b:ghost", "prompt": "x"})
    assert ghost.status_code == 400 and ghost.json()["object"] == "error" and ghost.json()["code"] == 400


def test_completions_report_cached_tokens_only_with_cache_report(server):
    body = {"model": "qwen3-8b", "prompt": [3, 4, 5], "max_tokens": 4}
    post(server, "/v1/completions", body)
    assert post(server, "/v1/completions", body).json()["usage"]["prompt_tokens_details"] is None
    with SGLangTestServer(ScriptedEngine(), served_model_name="qwen3-8b", cache_report=True) as reporting:
        post(reporting, "/v1/completions", body)
        assert post(reporting, "/v1/completions", body).json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}


# ----- aborts and health (managers/tokenizer_manager.py, entrypoints/http_server.py)


def test_abort_shapes_by_status(server):
    server.abort_next("Aborted")  # no status: a 200 whose finish_reason says abort
    plain = generate(server, text="x").json()["meta_info"]["finish_reason"]
    assert plain["type"] == "abort" and plain["message"] == "Aborted" and plain["status_code"] is None
    server.abort_next("bad input", status=400)
    assert generate(server, text="x").json() == {"error": {"message": "bad input"}}
    server.abort_next("Retracted under decode memory pressure without a KV backup. Retry later.", status=503)
    busy = generate(server, text="x")
    assert busy.status_code == 503 and busy.json()["object"] == "error" and busy.json()["type"] == "503"


def test_health_is_503_while_starting():
    with SGLangTestServer(ScriptedEngine(), starting=True) as srv:
        assert httpx.get(srv.url + "/health").status_code == 503 == httpx.get(srv.url + "/ready").status_code
        assert generate(srv, text="x").status_code == 503
        srv.finish_starting()
        assert httpx.get(srv.url + "/health").status_code == 200 == generate(srv, text="x").status_code


# ----- the stand-in's own machinery


def test_adapter_override_applies_to_the_next_adapter_call_only(server):
    server.override_next_adapter_output("not json at all")
    base = generate(server, text="x").json()
    cleaned = generate(server, text="x", lora_path="free").json()
    normal = generate(server, text="x", lora_path="free").json()
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
            sampling = SamplingParams.greedy()
            return await asyncio.gather(
                *(backend.generate(GenerateRequest(64, text=f"p{i}", sampling=sampling)) for i in range(256))
            )
        finally:
            await backend.aclose()

    results = asyncio.run(main())
    assert len(results) == 256 and all(r.finish_reason == "stop" for r in results)
    assert server.max_in_flight == 256


def test_fault_queue_keeps_order_and_an_abort_waits_for_its_parsed_request():
    queue = FaultQueue()
    queue.add(Fault("abort", status=None, message="stop"), 1)
    queue.add(Fault("status", status=429), 1)
    assert queue.next_transport() is None  # the abort is first: the transport layer lets the request through
    abort = queue.next_reply()
    assert abort.abort_refusal() is None and abort.abort_meta()["finish_reason"]["type"] == "abort"
    refusal = queue.next_transport().status_refusal()
    assert (refusal.status, refusal.body(openai_route=False)) == (429, {"error": {"message": "scripted server error"}})
    assert queue.next_transport() is None and queue.next_reply() is None
    assert Fault("status", status=None).status_refusal().body(openai_route=False)["type"] == "500"
