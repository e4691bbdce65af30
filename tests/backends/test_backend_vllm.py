"""VLLMBackend (and OpenAIBackend facing vLLM) against replies recorded from a real vLLM 0.32.0 server.

The replies are vLLM's own (tests/backends/vllm_replay.py); what the server does with a
request is tested against the real server in tests/realserver/test_vllm.py.
"""

from __future__ import annotations

from functools import partial

import pytest
from backend_calls import call
from repo_paths import EMBEDDED
from vllm_replay import EXCHANGES, ReplayTestServer

from freelm.backends.base import (
    BackendError,
    ContextLengthError,
    ContextWindow,
    GenerateRequest,
    SamplingParams,
    refused,
)
from freelm.backends.openai_compat import OpenAIBackend
from freelm.backends.vllm import VLLMBackend
from freelm.tokenizer import Tokenizer

EMBEDDED = EMBEDDED / "base"
GREEDY = SamplingParams.greedy()
run = partial(call, VLLMBackend)


@pytest.fixture
def server():
    with ReplayTestServer() as srv:
        yield srv


def completion_bodies(server: ReplayTestServer) -> list[dict]:
    return [body for path, body in server.bodies if path == "/v1/completions"]


def test_token_ids_in_and_out_with_the_end_token_kept_in_text(server):
    server.answer_next("base_stop")
    result = run(lambda b: b.generate(GenerateRequest(400, input_ids=[1, 2, 3], sampling=GREEDY)), server.base_url)
    body = completion_bodies(server)[-1]
    assert body["model"] == "" and body["prompt"] == [1, 2, 3]  # no model yet: vLLM serves the base for ""
    assert body["return_token_ids"] is True and body["include_stop_str_in_output"] is True
    assert body["skip_special_tokens"] is False and body["repetition_penalty"] == 1.0 and "repeat_penalty" not in body
    recorded = EXCHANGES["base_stop"]["response"]["choices"][0]
    assert result.output_ids == recorded["token_ids"] and result.finish_reason == "stop"
    assert result.completion_tokens == len(result.output_ids) == 188 and result.cached_tokens == 32
    tokenizer = Tokenizer.from_pretrained(EMBEDDED)  # the end token is in both: text == decode(output_ids)
    assert result.text.endswith("<|im_end|>") and tokenizer.decode(result.output_ids) == result.text


def test_without_the_fields_vllm_trims_the_end_token_and_the_specials():
    """Why the fields are sent: the same request without them (recorded) loses '</think>' and '<|im_end|>'."""
    trimmed = EXCHANGES["trimmed"]["response"]["choices"][0]
    kept = EXCHANGES["base_stop"]["response"]["choices"][0]
    assert trimmed.get("token_ids") is None and "</think>" not in trimmed["text"] and "</think>" in kept["text"]
    assert not trimmed["text"].endswith("<|im_end|>") and kept["text"].endswith("<|im_end|>")


def test_startup_check_proves_adapters_by_their_bare_name_and_learns_the_model(server):
    server.answer_next("models", "base_one", "adapter_one", "models")

    async def go(backend):
        served = await backend.startup_check([None, "free"], probe_ids=[1, 2])
        return served, await backend.server_limits()

    served, limits = run(go, server.base_url)
    base, adapter = completion_bodies(server)
    assert base["model"] == "embedded" and base["prompt"] == [1, 2] and adapter["model"] == "free"
    assert served["base_model"] == "embedded" and served["adapters"] == {"free": "freelm/assets/embedded/free"}
    assert served["cache_report"] is True
    assert limits.window == ContextWindow(1023, 1024, limits.window.source) and limits.seeds_honoured is True


@pytest.mark.parametrize("adapter", ["Free", "embedded:free"])
def test_an_adapter_not_served_under_the_exact_name_fails_before_any_request(server, adapter):
    with pytest.raises(BackendError, match=rf"adapter '{adapter}' is not served here") as info:
        run(lambda b: b.startup_check([None, adapter]), server.base_url)
    assert "--lora-modules" in str(info.value) and "['embedded', 'free']" in str(info.value)
    assert completion_bodies(server) == []


def test_a_server_without_token_ids_is_refused(server):
    server.answer_next("models", "trimmed_one")
    with pytest.raises(BackendError, match="without token_ids"):
        run(lambda b: b.startup_check([None], probe_ids=[1]), server.base_url, "embedded")


def test_openai_backend_no_longer_takes_vllms_adapter_card_for_sglangs_name(server):
    """The silent-vanilla bug: 'free' (parent 'embedded') was taken as proof that 'embedded:free' is served."""
    server.answer_next("models", "sglang_name")
    with pytest.raises(BackendError, match="adapter 'free' \\(model name 'embedded:free'\\) is not served") as info:
        call(OpenAIBackend, lambda b: b.startup_check([None, "free"]), server.base_url, "embedded", max_retries=0)
    assert "does not exist" in str(info.value) and "use --backend vllm" in str(info.value)
    assert completion_bodies(server)[-1]["model"] == "embedded:free"


def test_window_is_clamped_to_max_model_len_and_the_edge_is_served():
    window = ContextWindow.vllm(1024)  # api_utils.py get_max_tokens: max_tokens = min(asked, 1024 - prompt)
    clamped = EXCHANGES["window_clamped"]["response"]  # 1020 + 200 asked: 4 served, "length", status 200
    assert clamped["usage"]["prompt_tokens"] + clamped["usage"]["completion_tokens"] == window.max_total
    assert window.room(1020) == 4 and window.room(1023) == 1 and window.room(1024) == 0


@pytest.mark.parametrize("exchange", ["window_exact", "window_over", "max_tokens_over"])
def test_vllm_window_refusals_end_the_rollout_as_context_overflow(server, exchange):
    server.answer_next(exchange)
    with pytest.raises(ContextLengthError) as info:
        run(lambda b: b.generate(GenerateRequest(200, input_ids=[1], sampling=GREEDY)), server.base_url, "embedded")
    assert "HTTP 400" in str(info.value)


@pytest.mark.parametrize(
    "wording",
    [  # older vLLM refused prompt + max_tokens past the window instead of clamping
        "This model's maximum context length is 1024 tokens. However, you requested 1100 tokens "
        "(1000 in the messages, 100 in the completion). Please reduce the length of the messages or completion.",
        "This model's maximum context length is 1024 tokens. However, you requested 100 output tokens and your "
        "prompt contains at least 1000 input tokens, for a total of at least 1100 tokens.",
        "The decoder prompt (length 1030) is longer than the maximum model length of 1024. Make sure that "
        "`max_model_len` is no smaller than the number of text tokens.",
    ],
)
def test_other_vllm_window_wordings_are_context_overflow(wording):
    assert isinstance(refused("x", wording, 400), ContextLengthError)
    assert not isinstance(refused("x", "max_tokens must be at least 1, got -3.", 400), ContextLengthError)


def test_runtime_adapter_load_and_unload(server):
    server.answer_next("load_lora", "unload_lora", "unload_unknown")

    async def go(backend):
        loaded = await backend.load_adapter("free2", "/ckpt/free")
        added = dict(backend.adapters)
        await backend.unload_adapter("free2")
        with pytest.raises(BackendError, match="cannot be found"):
            await backend.unload_adapter("ghost")
        with pytest.raises(BackendError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):  # FastAPI's 404: no such route
            await backend.load_adapter("x", "/ckpt/x")
        return loaded, added, backend.adapters

    loaded, added, after = run(go, server.base_url, "embedded", max_retries=0)
    assert "added successfully" in loaded and added == {"free2": "/ckpt/free"} and after == {}
    assert server.bodies[0] == ("/v1/load_lora_adapter", {"lora_name": "free2", "lora_path": "/ckpt/free"})


def test_the_runner_builds_it_with_the_flags_it_shares_with_the_openai_kind():
    from freelm.backends import BackendArgs, get_backend_kind
    from freelm.run.flags import build_parser

    parser = build_parser()
    assert [a.option_strings for a in parser._actions].count(["--served-model"]) == 1  # one declaration, added once
    args = BackendArgs(url="http://h:1", timeout=7.0, flags={"served_model": None, "api_key_env": "VLLM_KEY"})
    assert get_backend_kind("vllm").options(args) == {
        "base_url": "http://h:1/v1", "model": None, "api_key_env": "VLLM_KEY", "timeout": 7.0, "max_retries": 0,
    }  # fmt: skip
    assert get_backend_kind("vllm").needs == ()  # /v1/models names the served model
