"""SGLang 0.5.23's request and response shapes, as the stand-in (:mod:`freelm.testing.sglang_server`) applies them.

One place for the wire format, as SGLang keeps its request structs in
``managers/io_struct.py``: what ``/generate`` and ``/v1/completions`` accept
(:func:`parse_generate`, :func:`parse_completion`: the API contract's typed
fields, ``SamplingParams.verify``, the OpenAI ``model`` parsing), how a
finished request is returned (:func:`shape_output`, :func:`meta_info`: stop
trimming and ``finish_reason``) and the error bodies (:class:`Refusal`). Each
rule names the SGLang file it comes from (paths under ``sglang/srt/`` unless
noted); the admission rules that need server state (window, adapters, seeds)
stay with the server.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Literal

from freelm.backends.base import GenerateRequest, GenerateResult, SamplingParams

if TYPE_CHECKING:
    from freelm.testing.engines import Engine

#: The keys SGLang's API contract accepts inside ``sampling_params`` (``sglang/api/v1/api_types.py``).
SAMPLING_KEYS = (
    "max_new_tokens",
    "stop",
    "stop_token_ids",
    "stop_regex",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "min_new_tokens",
    "n",
    "json_schema",
    "regex",
    "ebnf",
    "structural_tag",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "stream_interval",
    "logit_bias",
    "sampling_seed",
    "custom_params",
    "beam_width",
)
TOP_K_ALL = 1 << 30


class Refusal(Exception):
    """An HTTP error, rendered in the body SGLang uses for its kind (``entrypoints/http_server.py``).

    ``contract``: the ``/generate`` schema check, ``{"error": "<str>"}``
    (``generate_request`` -> ``api_contract.generate_contract_error``);
    ``value``: a ValueError, ``{"error": {"message"}}`` on native routes
    (``_create_error_response``) and ``{"object": "error", ...}`` on ``/v1``
    (``entrypoints/openai/serving_base.py: create_error_response``);
    ``http``: an HTTPException, ``{"object": "error", "message", "type": str(status),
    "param": null, "code"}`` (``validation_exception_handler``); ``lora``: a LoRA
    load/unload failure, ``{"success": false, "error_message", "loaded_adapters"}`` with 400.
    """

    def __init__(self, status: int, message: str, kind: Literal["contract", "value", "http", "lora"] = "value"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind

    def body(self, openai_route: bool) -> dict[str, Any]:
        if self.kind == "lora":
            return {"success": False, "error_message": self.message, "loaded_adapters": None}
        if self.kind == "http":
            return {
                "object": "error",
                "message": self.message,
                "type": str(self.status),
                "param": None,
                "code": self.status,
            }
        if openai_route:
            return {"object": "error", "message": self.message, "type": "BadRequestError", "param": None, "code": 400}
        if self.kind == "contract":
            return {"error": self.message}
        return {"error": {"message": self.message}}


def shape_output(
    result: GenerateResult,
    request: GenerateRequest,
    engine: Engine,
    skip_special: bool,
    no_trim: bool,
    overridden: bool = False,
) -> tuple[str, dict[str, Any]]:
    """``text`` and ``finish_reason`` as SGLang returns them; ``output_ids`` are never trimmed.

    ``managers/schedule_batch.py``: a stop string found in the output finishes
    with ``matched`` = that string (``FINISH_MATCHED_STR``), an eos with the
    token id (``FINISH_MATCHED_TOKEN``), the budget with ``{"type": "length",
    "length": max_new_tokens}``. ``managers/detokenizer_manager.py:
    trim_matched_stop``: the text ends right after a matched stop string with
    ``no_stop_trim`` (even when the last token runs past it) and before it
    without; a matched stop token is dropped before decoding unless
    ``no_stop_trim``. ``skip_special_tokens`` (default true) drops special tokens.
    """
    ids = result.output_ids
    if result.finish_reason == "length":
        return engine.decode(ids, skip_special_tokens=skip_special), {
            "type": "length",
            "length": request.max_new_tokens,
        }
    full = engine.decode(ids, skip_special_tokens=False)
    matched = next((s for s in request.stop if s and s in full), None)
    if matched is not None:
        text = engine.decode(ids, skip_special_tokens=skip_special)
        position = text.find(matched)
        if position >= 0:
            text = text[: position + len(matched)] if no_trim else text[:position]
        return text, {"type": "stop", "matched": matched}
    if overridden or not ids or engine.decode(ids[-1:], skip_special_tokens=True):
        # no stop token at the end: a scripted override, or a test engine that stops without emitting one
        return engine.decode(ids, skip_special_tokens=skip_special), {"type": "stop", "matched": None}
    kept = ids if no_trim else ids[:-1]
    return engine.decode(kept, skip_special_tokens=skip_special), {"type": "stop", "matched": ids[-1]}


def meta_info(result: GenerateResult, finish: dict[str, Any]) -> dict:
    """``/generate``'s ``meta_info`` (``managers/tokenizer_manager.py: _handle_batch_output``)."""
    return {
        "id": uuid.uuid4().hex,
        "finish_reason": finish,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens or 0,
    }


def typed_field(body: Any, key: str, kind: type, default: Any = ..., contract: bool = False) -> Any:
    """One typed field; a wrong type is the schema check's 400 (serde's wording, ``sglang/api/v1/api_types.py``)."""
    refusal = "contract" if contract else "value"
    if not isinstance(body, dict):
        raise Refusal(400, "invalid type: expected a JSON object", refusal)
    if key not in body or body[key] is None:
        if default is ...:
            raise Refusal(400, f"missing field `{key}`", refusal)
        return default
    value = body[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Refusal(400, f"invalid type: {type(value).__name__} for `{key}`, expected {kind.__name__}", refusal)
    return value


def _sampling(params: dict, max_tokens_key: str, default_max: int, contract: bool) -> tuple[dict, SamplingParams]:
    """``sampling/sampling_params.py: SamplingParams.verify`` on the values SGLang reads."""
    top_k = typed_field(params, "top_k", int, -1, contract)
    sampling = SamplingParams(
        temperature=typed_field(params, "temperature", float, 1.0, contract),
        top_p=typed_field(params, "top_p", float, 1.0, contract),
        top_k=-1 if top_k >= TOP_K_ALL else top_k,
        min_p=typed_field(params, "min_p", float, 0.0, contract),
    )
    if sampling.temperature < 0:
        raise Refusal(400, f"temperature must be non-negative, got {sampling.temperature}.")
    if not 0 < sampling.top_p <= 1:
        raise Refusal(400, f"top_p must be in (0, 1], got {sampling.top_p}.")
    if not 0 <= sampling.min_p <= 1:
        raise Refusal(400, f"min_p must be in [0, 1], got {sampling.min_p}.")
    if sampling.top_k == 0 or sampling.top_k < -1:
        raise Refusal(400, f"top_k must be -1 (disable) or at least 1, got {sampling.top_k}.")
    stop = params.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise Refusal(
            400, "invalid type: `stop` must be a string or a list of strings", "contract" if contract else "value"
        )
    max_new = typed_field(params, max_tokens_key, int, default_max, contract)
    if max_new < 0:
        raise Refusal(400, f"max_new_tokens must be at least 0, got {max_new}.")
    extra = {"max_new_tokens": max(1, max_new), "stop": stop, "seed": params.get("sampling_seed", params.get("seed"))}
    return extra, sampling


def parse_generate(body: Any) -> tuple[GenerateRequest, bool, bool]:
    """A ``/generate`` body as ``(request, skip_special_tokens, no_stop_trim)``; a bad body is a :class:`Refusal`."""
    if not isinstance(body, dict):
        raise Refusal(400, "invalid type: expected struct GenerateRequest", "contract")
    params = typed_field(body, "sampling_params", dict, {}, contract=True)
    unknown = [k for k in params if k not in SAMPLING_KEYS]
    if unknown:  # sglang/api/v1/api_types.py: unknown keys inside sampling_params fail the contract
        listed = ", ".join(f"`{k}`" for k in SAMPLING_KEYS)
        raise Refusal(400, f"unknown field `{unknown[0]}`, expected one of {listed}", "contract")
    has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
    if has_ids and not _is_id_list(body["input_ids"]) or has_text and not isinstance(body["text"], str):
        raise Refusal(400, "this stand-in takes one prompt per request: `text` a string or `input_ids` a list of ints")
    if not (has_text or has_ids):  # managers/io_struct.py: GenerateReqInput._validate_inputs
        raise Refusal(400, "Either text, input_ids or input_embeds should be provided.")
    extra, sampling = _sampling(params, "max_new_tokens", 128, contract=True)
    adapter = typed_field(body, "lora_path", str, None, contract=True)
    # managers/tokenizer_manager.py: _tokenize_one_request takes input_ids when both are given
    prompt = {"input_ids": body["input_ids"]} if has_ids else {"text": body["text"]}
    return (
        GenerateRequest(sampling=sampling, adapter=adapter, **prompt, **extra),
        typed_field(params, "skip_special_tokens", bool, True, True),
        typed_field(params, "no_stop_trim", bool, False, True),
    )


def parse_completion(body: Any, served: str) -> tuple[GenerateRequest, bool, bool]:
    """A ``/v1/completions`` body as ``(request, skip_special_tokens, no_stop_trim)``; ``served``: the model name."""
    model = typed_field(body, "model", str)
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        prompt_field = {"text": prompt}
    elif _is_id_list(prompt) and prompt:
        prompt_field = {"input_ids": prompt}
    elif not prompt:  # entrypoints/openai/serving_completions.py: _validate_request
        raise Refusal(400, "Prompt cannot be empty")
    else:
        raise Refusal(400, "this stand-in takes one prompt per request: `prompt` a string or a list of ints")
    extra, sampling = _sampling(body, "max_tokens", 16, contract=False)
    adapter = parse_model_adapter(model, served) or typed_field(body, "lora_path", str, None)
    return (
        GenerateRequest(sampling=sampling, adapter=adapter, **prompt_field, **extra),
        typed_field(body, "skip_special_tokens", bool, True),
        typed_field(body, "no_stop_trim", bool, False),
    )


def parse_model_adapter(model: str, served: str) -> str | None:
    """``entrypoints/openai/serving_base.py: _parse_model_parameter``.

    ``served`` or no colon -> base, ``served:NAME`` -> NAME, else split at the first colon.
    """
    if model == served or ":" not in model:
        return None
    if model.startswith(served + ":"):
        return model[len(served) + 1 :].strip() or None
    return model.split(":", 1)[1].strip() or None


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
