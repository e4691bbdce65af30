"""OpenAIBackend over real HTTP against the test server's /v1/completions (SGLang's served:adapter convention)."""

from __future__ import annotations

import traceback
from functools import partial

import pytest
from backend_calls import call, scripted_server_fixture

from freelm.backends.base import BackendError, ContextWindow, GenerateRequest, SamplingParams, TransientBackendError
from freelm.backends.openai_compat import OpenAIBackend
from freelm.testing.openai_chat_server import OpenAIChatTestServer

GREEDY = SamplingParams.greedy()
SECRET = "sk-test-0123456789-do-not-leak"


run = partial(call, OpenAIBackend)


scripted_server = scripted_server_fixture({None: "thinking...", "free": "[]"}, served_model_name="m")


@pytest.fixture
def scripted(scripted_server, monkeypatch):
    monkeypatch.setenv("FREELM_TEST_KEY", SECRET)
    scripted_server.reset()
    return scripted_server


def test_adapter_via_model_name_and_token_prompt(local_sglang_server, free_example):
    async def go(backend):
        on = await backend.generate(
            GenerateRequest(64, input_ids=free_example.prompt_ids, sampling=GREEDY, adapter="free")
        )
        again = await backend.generate(
            GenerateRequest(64, input_ids=free_example.prompt_ids, sampling=GREEDY, adapter="free")
        )
        off = await backend.generate(GenerateRequest(64, text=free_example.prompt, sampling=GREEDY))
        return on, again, off

    on, again, off = run(go, local_sglang_server.url + "/v1", "tiny")
    # OpenAI convention: the server trims the eos; output ids are not part of the API
    assert on.text == free_example.target and on.output_ids == [] and on.finish_reason == "stop"
    assert on.prompt_tokens == len(free_example.prompt_ids) and on.completion_tokens == len(free_example.target_ids)
    assert again.cached_tokens == len(free_example.prompt_ids) - 1
    assert off.text != free_example.target
    assert local_sglang_server.adapter_requests == {"free": 2, None: 1}
    body = local_sglang_server.bodies[0]
    assert body["model"] == "tiny:free" and body["prompt"] == free_example.prompt_ids
    assert "top_k" not in body and body["skip_special_tokens"] is False  # greedy: top_k means nothing
    assert body["repetition_penalty"] == body["repeat_penalty"] == 1.0  # llama.cpp servers default to 1.1


def test_explicit_adapter_model_map(scripted):
    backend_kw = {"api_key_env": "FREELM_TEST_KEY", "adapter_models": {"free": "m:free"}}
    res = run(
        lambda b: b.generate(GenerateRequest(32, text="p", adapter="free")), scripted.url + "/v1", "m", **backend_kw
    )
    assert res.text == "[]" and scripted.adapter_requests == {"free": 1}


def test_unknown_adapter_is_final_and_the_key_never_leaks(scripted):
    scripted.fail_next(401, message=f"invalid api key {SECRET}")  # a server that echoes the key
    with pytest.raises(BackendError) as bad_key:
        run(
            lambda b: b.generate(GenerateRequest(4, text="p")), scripted.url + "/v1", "m", api_key_env="FREELM_TEST_KEY"
        )
    with pytest.raises(BackendError, match="never been loaded") as ghost:
        run(
            lambda b: b.generate(GenerateRequest(4, text="p", adapter="ghost")),
            scripted.url + "/v1",
            "m",
            api_key_env="FREELM_TEST_KEY",
        )
    for info in (bad_key, ghost):
        assert not isinstance(info.value, TransientBackendError)
        rendered = "".join(traceback.format_exception(info.value)) + repr(info.value)
        assert SECRET not in rendered
    assert "***" in str(bad_key.value)
    assert scripted.requests["/v1/completions"] == 2  # 4xx: no client retries


def test_5xx_retried_by_the_client_then_transient(scripted):
    scripted.fail_next(503, times=1)
    ok = run(lambda b: b.generate(GenerateRequest(32, text="p")), scripted.url + "/v1", "m", max_retries=1)
    assert ok.text == "thinking..." and scripted.requests["/v1/completions"] == 2
    scripted.reset()
    scripted.fail_next(500, message="boom", times=3)
    with pytest.raises(TransientBackendError, match="HTTP 500"):
        run(lambda b: b.generate(GenerateRequest(4, text="p")), scripted.url + "/v1", "m", max_retries=1)
    assert scripted.requests["/v1/completions"] == 2


def test_timeout_and_dropped_connection_are_transient(scripted):
    scripted.delay_next(1.0, times=1)
    with pytest.raises(TransientBackendError, match="Timeout"):
        run(lambda b: b.generate(GenerateRequest(4, text="p")), scripted.url + "/v1", "m", timeout=0.3, max_retries=0)
    scripted.drop_next(times=1)
    with pytest.raises(TransientBackendError, match="Connection"):
        run(lambda b: b.generate(GenerateRequest(4, text="p")), scripted.url + "/v1", "m", max_retries=0)


def test_length_finish_and_health(scripted):
    async def go(backend):
        return await backend.generate(GenerateRequest(3, text="p")), await backend.health()

    res, healthy = run(go, scripted.url + "/v1", "m")
    assert res.finish_reason == "length" and res.text == "thi" and res.completion_tokens == 3
    assert healthy


def test_standard_only_sends_no_extension_fields(scripted):
    run(lambda b: b.generate(GenerateRequest(8, text="p")), scripted.url + "/v1", "m", standard_only=True)
    body = scripted.bodies[-1]
    assert not {"top_k", "min_p", "skip_special_tokens"} & set(body)
    assert body["temperature"] == 0.6 and body["max_tokens"] == 8


# ----- what real servers need (issue: llama-server / llama-cpp-python) ----------------------------------


def test_top_k_sent_only_when_sampling(scripted):
    run(
        lambda b: b.generate(GenerateRequest(8, text="p", sampling=SamplingParams(top_k=-1))), scripted.url + "/v1", "m"
    )
    assert scripted.bodies[-1]["top_k"] == -1  # sampling with top-k off: sent, or the server's own k applies


def test_startup_check_names_the_missing_adapter_and_endpoint(scripted):
    with pytest.raises(BackendError, match=r"adapter 'ghost'.*not served here") as info:
        run(lambda b: b.startup_check([None, "ghost"]), scripted.url + "/v1", "m")
    assert scripted.url in str(info.value)
    served = run(lambda b: b.startup_check([None, "free"]), scripted.url + "/v1", "m")  # SGLang: 'free', parent 'm'
    assert served["models"][0] == "m" and served["text_prompts"] is False
    assert served["sent"] == {"repetition_penalty": 1.0, "repeat_penalty": 1.0}


def test_response_from_another_model_is_refused():
    # llama-cpp-python (and llama-server) accept any model name and answer with their own: an adapter is ignored
    with OpenAIChatTestServer("thinking more", model="smol") as server:
        with pytest.raises(BackendError, match=r"asked for model 'smol:free' but the response came from 'smol'"):
            run(lambda b: b.generate(GenerateRequest(4, text="p", adapter="free")), server.base_url, "smol")


def test_text_only_server_detected_at_startup_and_its_500_is_final_and_short():
    decoded = []

    def decode(ids):
        decoded.append(ids)
        return "decoded text"

    with OpenAIChatTestServer("one two three", model="smol") as server:
        with pytest.raises(BackendError) as info:  # token ids without detection: a validation 500
            run(lambda b: b.generate(GenerateRequest(4, input_ids=[1, 2])), server.base_url, "smol")
        assert not isinstance(info.value, TransientBackendError)  # retrying the same schema error is pointless
        assert len(str(info.value)) < 500 and "chars)" in str(info.value)  # a 9-60 KB body, truncated

        async def go(backend):
            served = await backend.startup_check([None], probe_ids=[1, 2])
            return served, await backend.generate(GenerateRequest(2, input_ids=[5, 6, 7]))

        served, result = run(go, server.base_url, "smol", decode=decode)
    assert served["text_prompts"] is True
    assert server.bodies[-1]["prompt"] == "decoded text" and decoded[-1] == [5, 6, 7]
    assert result.text == "one two" and result.finish_reason == "length"


def test_health_keeps_the_reason():
    async def go(backend):
        return await backend.health(), backend.health_error

    with OpenAIChatTestServer() as server:
        url = server.base_url
    ok, reason = run(go, url, "m", max_retries=0)  # nothing listens any more: the probe fails, and says why
    assert not ok and "APIConnectionError" in reason


def test_llama_server_window_is_one_slot_less_the_token_it_stops_before():
    window = ContextWindow.llama_server(256)  # server-context.cpp: prompt >= n_ctx refused, stops at n_ctx - 1
    assert window.room(200) == 55 and window.room(254) == 1 and window.room(255) == 0
    # the manifest and the runner's warnings name where a window came from
    assert window.source == "llama-server n_ctx 256"
    assert (
        ContextWindow.llama_server(256, source="http://h/v1/models meta.n_ctx").source
        == "http://h/v1/models meta.n_ctx"
    )
