"""A real HTTP server speaking SGLang 0.5.23's protocol, for tests and benchmarks (SGLang itself cannot run on CPU).

Every rule it applies is SGLang 0.5.23's, read in the released wheel, and names
the file it comes from (paths under ``sglang/srt/``); docs/backends.md keeps the
table of rules with the test of each. When this stand-in and SGLang differ, the
stand-in is the bug.

Endpoints (``entrypoints/http_server.py``): ``POST /generate``, ``GET /health``,
``/health_generate``, ``/ready``, ``/model_info``, ``/server_info``, ``POST
/flush_cache``, ``/load_lora_adapter``, ``/unload_lora_adapter``, ``POST
/v1/completions``, ``GET /v1/models``. The rules themselves are in
:meth:`SGLangTestServer._admit` (window, LoRA, seeds), :func:`shape_output`
(stop trimming), :class:`~freelm.testing.radix_cache.RadixCache` (``cached_tokens``)
and :class:`Refusal` (the four error bodies).

Threads (:mod:`freelm.testing.http_server`): 256 concurrent rollouts are 256
mostly-sleeping threads, and the "dropped connection" fault closes a socket
mid-request in one call.

The engine is pluggable (:class:`Engine`): :class:`freelm.backends.local.LocalBackend`
or :class:`ScriptedEngine` (fixed delay, scripted text per adapter, no model).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from freelm.backends.base import BackendError, GenerateRequest, GenerateResult, SamplingParams
from freelm.testing.http_server import LocalHTTPServer, QuietHandler
from freelm.testing.radix_cache import RadixCache

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
#: ``sampling/sampling_batch_info.py``: under deterministic inference an unseeded request samples with seed 42.
DEFAULT_DETERMINISTIC_SEED = 42


class Engine(Protocol):
    """What the server needs from a model. ``generate_blocking`` may block; it is called from handler threads.

    ``text`` in the result is the untrimmed decoding with special tokens kept;
    the server applies ``no_stop_trim`` / ``skip_special_tokens`` itself via ``decode``.
    Bad requests raise :class:`BackendError` (-> HTTP 400).
    """

    adapter_names: list[str]

    def generate_blocking(self, request: GenerateRequest) -> GenerateResult: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def flush_cache(self) -> None: ...


Script = str | Callable[[GenerateRequest], str]


class ScriptedEngine:
    """A model-free engine: every call sleeps ``delay`` seconds and answers the scripted text for its adapter.

    ``outputs`` maps an adapter name (``None`` = base model) to a string or to a
    function of the request. Token ids are UTF-8 bytes + ``ID_OFFSET`` (a
    stand-in tokenizer, so ``output_ids`` decode back to ``text``), id ``EOS_ID``
    ends every answer that fits in ``max_new_tokens``. A ``stop`` string in the
    scripted text ends the answer right after it. ``cached_tokens`` comes from
    the server's radix cache, not from the engine.
    """

    EOS_ID = 1
    ID_OFFSET = 2
    EOS_TEXT = "<|im_end|>"

    def __init__(self, outputs: dict[str | None, Script] | None = None, *, delay: float = 0.0):
        self.outputs: dict[str | None, Script] = dict(outputs or {None: "Let me think. \\boxed{0}"})
        self.delay = delay
        self._lock = threading.Lock()
        self._loaded = [name for name in self.outputs if name is not None]

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self._loaded)

    def encode(self, text: str) -> list[int]:
        return [b + self.ID_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        parts, buf = [], bytearray()
        for i in ids:
            if i == self.EOS_ID:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special_tokens:
                    parts.append(self.EOS_TEXT)
            else:
                buf.append((i - self.ID_OFFSET) % 256)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def load_adapter(self, name: str, path: str) -> None:
        with self._lock:
            if name in self._loaded:
                raise BackendError(f"Failed to load LoRA adapter {name} because it is already loaded")
            self._loaded.append(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self._loaded:
                self._loaded.remove(name)

    def flush_cache(self) -> None:
        return None

    def generate_blocking(self, request: GenerateRequest) -> GenerateResult:
        script = self.outputs.get(request.adapter, self.outputs.get(None, ""))
        answer = script(request) if callable(script) else script
        prompt = list(request.input_ids) if request.input_ids is not None else self.encode(request.text or "")
        time.sleep(self.delay)
        cuts = [answer.find(s) + len(s) for s in request.stop if s and s in answer]
        # a stop string ends the answer right after it (no eos), as a real engine would stop there
        ids = self.encode(answer[: min(cuts)]) if cuts else self.encode(answer) + [self.EOS_ID]
        finish: Literal["stop", "length"] = "stop"
        if len(ids) > request.max_new_tokens:
            ids, finish = ids[: request.max_new_tokens], "length"
        return GenerateResult(
            text=self.decode(ids),
            output_ids=ids,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=len(ids),
        )


class ScriptedTokenizer:
    """The :class:`ScriptedEngine`'s ids behind the Hugging Face calls :class:`freelm.tokenizer.Tokenizer` makes.

    ``Tokenizer(ScriptedTokenizer())`` lets the loop send exactly the ids the
    scripted server speaks, with no model, no tokenizer files and no training.
    """

    chat_template = None
    eos_token_id = ScriptedEngine.EOS_ID

    def __init__(self) -> None:
        self._engine = ScriptedEngine()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._engine.encode(text)

    def decode(
        self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        return self._engine.decode(ids, skip_special_tokens=skip_special_tokens)


@dataclass
class Fault:
    """One scripted misbehaviour, consumed by the next generation request (``/generate`` or ``/v1/completions``).

    ``status``: answer HTTP ``status`` with ``message`` in SGLang's body for that
    status; ``drop``: close the socket without answering; ``delay``: sleep
    ``seconds`` first, then answer normally (past a short client timeout);
    ``abort``: the scheduler aborts the request with ``message`` and
    ``status`` (``None``: a 200 whose ``finish_reason`` is ``abort``).
    """

    kind: Literal["status", "drop", "delay", "abort"]
    status: int | None = 503
    message: str = "scripted server error"
    seconds: float = 0.0


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


@dataclass
class _Adapter:
    """A registered LoRA: ``lora_id`` names its cache namespace (a new one per load)."""

    path: str
    lora_id: str
    loaded: bool = True


class SGLangTestServer(LocalHTTPServer):
    """``with SGLangTestServer(engine) as srv: ... srv.url``: a background-thread server on 127.0.0.1.

    Served like ``python -m sglang.launch_server`` with: ``context_length``
    (``--context-length``; default the engine's own, else 32768),
    ``kv_capacity`` (tokens the KV pool holds: bounds the window and is the
    radix cache's budget; default 2**17), ``deterministic``
    (``--enable-deterministic-inference``), ``cache_report``
    (``--enable-cache-report``), ``starting`` (``/health`` answers 503 until
    :meth:`finish_starting`).

    Counters for routing assertions: ``requests`` (Counter by path),
    ``adapter_requests`` (Counter by adapter name, ``None`` = base),
    ``in_flight`` / ``max_in_flight`` (generation requests), and ``bodies``
    (the last 1000 generation request bodies as parsed JSON); ``engine_requests``
    the last 1000 requests as the engine got them (after SGLang's caps).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        adapters: dict[str, str] | None = None,
        served_model_name: str = "freelm-test",
        model_path: str = "",
        context_length: int | None = None,
        kv_capacity: int = 1 << 17,
        deterministic: bool = False,
        cache_report: bool = False,
        starting: bool = False,
    ):
        self.engine = engine
        self.context_length = context_length or getattr(engine, "context_length", None) or 32768
        self.kv_capacity = kv_capacity
        # managers/tp_worker.py: get_worker_info
        self.max_req_len = min(self.context_length - 1, kv_capacity - 1)
        self.max_req_input_len = self.max_req_len - 5
        self.deterministic = deterministic
        self.cache_report = cache_report
        self.served_model_name = served_model_name
        self.model_path = model_path or served_model_name
        self.cache = RadixCache(kv_capacity)
        self._lock = threading.Lock()
        self.adapters: dict[str, _Adapter] = {name: _Adapter("", _launch_id(name, "")) for name in engine.adapter_names}
        for name, path in (adapters or {}).items():
            engine.load_adapter(name, path)
            self.adapters[name] = _Adapter(str(path), _launch_id(name, str(path)))
        self._faults: deque[Fault] = deque()
        self._adapter_overrides: deque[str] = deque()
        self.status: Literal["starting", "up", "crashed"] = "starting" if starting else "up"
        self.in_flight = 0
        self.reset()

    @property
    def url(self) -> str:
        return self.origin

    @property
    def adapter_paths(self) -> dict[str, str]:
        """Registered adapters and their paths (``loaded_adapters`` in load/unload answers)."""
        return {name: a.path for name, a in self.adapters.items() if a.loaded}

    # ----- scripting ------------------------------------------------------

    def reset(self) -> None:
        """Forget queued faults and counters (between tests sharing one server)."""
        with self._lock:
            self._faults.clear()
            self._adapter_overrides.clear()
            self.requests: Counter[str] = Counter()
            self.adapter_requests: Counter[str | None] = Counter()
            self.max_in_flight = self.in_flight  # requests of an earlier test may still be running
            self.bodies: deque[dict] = deque(maxlen=1000)
            self.engine_requests: deque[GenerateRequest] = deque(maxlen=1000)

    def finish_starting(self) -> None:
        """The server is up: ``/health`` and ``/ready`` answer 200 from now on."""
        self.status = "up"

    def fail_next(self, status: int = 503, message: str = "scripted server error", times: int = 1) -> None:
        self._queue(Fault("status", status=status, message=message), times)

    def drop_next(self, times: int = 1) -> None:
        self._queue(Fault("drop"), times)

    def delay_next(self, seconds: float, times: int = 1) -> None:
        self._queue(Fault("delay", seconds=seconds), times)

    def abort_next(self, message: str = "Aborted", status: int | None = None, times: int = 1) -> None:
        """The scheduler aborts the next request (``managers/schedule_batch.py: FINISH_ABORT``)."""
        self._queue(Fault("abort", status=status, message=message), times)

    def override_next_adapter_output(self, text: str, times: int = 1) -> None:
        """The next adapter (cleaning) call answers ``text`` verbatim (e.g. malformed JSON) instead of the engine's."""
        with self._lock:
            self._adapter_overrides.extend([text] * times)

    def _queue(self, fault: Fault, times: int) -> None:
        with self._lock:
            self._faults.extend([fault] * times)

    # ----- request handling (called from handler threads) -----------------

    def _next_fault(self) -> Fault | None:
        """The next transport-level fault (status, drop, delay); an ``abort`` waits for its request to be parsed."""
        with self._lock:
            return self._faults.popleft() if self._faults and self._faults[0].kind != "abort" else None

    def _admit(self, request: GenerateRequest) -> GenerateRequest:
        """SGLang's checks between the HTTP route and the model, in its order; returns the request as scheduled."""
        n = len(request.input_ids) if request.input_ids is not None else len(self.engine.encode(request.text or ""))
        # managers/tokenizer_manager.py: _validate_one_request
        if n >= self.context_length:
            raise Refusal(
                400, f"The input ({n} tokens) is longer than the model's context length ({self.context_length} tokens)."
            )
        if n + request.max_new_tokens > self.context_length:
            raise Refusal(
                400,
                f"Requested token count exceeds the model's maximum context length of {self.context_length} tokens. "
                f"You requested a total of {n + request.max_new_tokens} tokens: {n} tokens from the input messages "
                f"and {request.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the "
                "input messages or the completion to fit within the limit.",
            )
        # managers/tokenizer_manager.py: _resolve_lora_path (an unloaded adapter is reloaded from its path)
        if request.adapter is not None:
            adapter = self.adapters.get(request.adapter)
            if adapter is None:
                raise Refusal(
                    400,
                    f"Got LoRA adapter that has never been loaded: {request.adapter}\n"
                    f"All loaded adapters: dict_keys({sorted(self.adapters)}).",
                )
            if not adapter.loaded:
                self._load(request.adapter, adapter.path)
        # managers/scheduler.py: init_req_max_new_tokens (silent cap), then managers/utils.py: validate_input_length
        capped = max(0, min(request.max_new_tokens, self.max_req_len - n - 1))
        if n >= self.max_req_input_len:
            raise Refusal(
                400,
                f"Input length ({n} tokens) exceeds the maximum allowed length ({self.max_req_input_len} tokens). "
                "Use a shorter input or enable --allow-auto-truncate.",
            )
        # sampling/sampling_batch_info.py: seeds only under --enable-deterministic-inference (unseeded: 42)
        seed = (
            (request.seed if request.seed is not None else DEFAULT_DETERMINISTIC_SEED) if self.deterministic else None
        )
        if self.deterministic and request.sampling.min_p > 0 and request.sampling.temperature > 0:
            # layers/sampler.py: the seeded sampler asserts on min_p; the assertion takes the scheduler down
            self.status = "crashed"
            raise Refusal(
                500, "AssertionError: With sampling seed, multinomial_with_seed will provide wrong results", "http"
            )
        return replace(request, max_new_tokens=capped, seed=seed)

    def _namespace(self, adapter: str | None) -> str | None:
        return None if adapter is None else self.adapters[adapter].lora_id

    def _run(self, request: GenerateRequest) -> tuple[GenerateResult, GenerateRequest, bool]:
        """Admit, run the engine, cache; also returns the request as scheduled, and whether an override answered."""
        with self._lock:
            if self.status != "up":
                raise Refusal(503, "the server is not up", kind="http")
            scheduled = self._admit(request)
            self.adapter_requests[request.adapter] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.engine_requests.append(scheduled)
            override = self._adapter_overrides.popleft() if request.adapter and self._adapter_overrides else None
            namespace = self._namespace(request.adapter)
        try:
            prompt = (
                list(scheduled.input_ids) if scheduled.input_ids is not None else self.engine.encode(scheduled.text)
            )
            cached = self.cache.match(namespace, prompt)
            try:
                result = self.engine.generate_blocking(scheduled)
            except BackendError as exc:
                raise Refusal(400, str(exc)) from exc
            if override is not None:
                result = _override(result, override, self.engine)
            self.cache.insert(namespace, prompt + result.output_ids[:-1])
            result = replace(result, cached_tokens=cached, prompt_tokens=len(prompt))
            return result, scheduled, override is not None
        finally:
            with self._lock:
                self.in_flight -= 1

    def handle_generate(self, body: Any) -> dict:
        request, skip_special, no_trim = _parse_generate(body)
        fault = self._abort_fault()
        if fault is not None:
            return {"text": "", "output_ids": [], "meta_info": _abort_meta(fault)}
        result, scheduled, overridden = self._run(request)
        text, finish = shape_output(result, scheduled, self.engine, skip_special, no_trim, overridden)
        return {"text": text, "output_ids": result.output_ids, "meta_info": _meta_info(result, finish)}

    def handle_completions(self, body: Any) -> dict:
        request, skip_special, no_trim = _parse_completion(body, self.served_model_name)
        fault = self._abort_fault()
        if fault is not None:
            choice_finish = "abort"
            result = GenerateResult(text="", output_ids=[], finish_reason="stop", prompt_tokens=0, completion_tokens=0)
            text = ""
        else:
            result, scheduled, overridden = self._run(request)
            text, finish = shape_output(result, scheduled, self.engine, skip_special, no_trim, overridden)
            choice_finish = finish["type"]
        # entrypoints/openai/usage_processor.py: cached_tokens only with --enable-cache-report
        details = {"cached_tokens": result.cached_tokens or 0} if self.cache_report else None
        return {
            "id": uuid.uuid4().hex,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": choice_finish}],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "prompt_tokens_details": details,
            },
        }

    def _abort_fault(self) -> Fault | None:
        """An ``abort`` fault: 400 -> a ValueError, 5xx -> an HTTPException, no status -> the body says abort.

        ``managers/tokenizer_manager.py: _handle_abort_finish_reason``.
        """
        with self._lock:
            if not self._faults or self._faults[0].kind != "abort":
                return None
            fault = self._faults.popleft()
        if fault.status is not None:
            raise Refusal(fault.status, fault.message, kind="value" if fault.status == 400 else "http")
        return fault

    def _load(self, name: str, path: str) -> None:
        """``managers/tokenizer_control_mixin.py: load_lora_adapter``: a fresh ``lora_id`` per load."""
        try:
            self.engine.load_adapter(name, path)
        except BackendError as exc:
            raise Refusal(400, str(exc), kind="lora") from exc
        old = self.adapters.get(name)
        if old is not None:
            self.cache.drop(old.lora_id)
        self.adapters[name] = _Adapter(path, uuid.uuid4().hex)

    def handle_load_adapter(self, body: Any) -> dict:
        name, path = _field(body, "lora_name", str), _field(body, "lora_path", str)
        with self._lock:
            if name in self.adapters and self.adapters[name].loaded:
                # lora/lora_manager.py: load_lora_adapter
                raise Refusal(400, f"Failed to load LoRA adapter {name} because it is already loaded", kind="lora")
            self._load(name, path)
            return {"success": True, "error_message": "", "loaded_adapters": self.adapter_paths}

    def handle_unload_adapter(self, body: Any) -> dict:
        """``lora/lora_registry.py: unregister``; the name stays in ``lora_ref_cache`` for an implicit reload."""
        name = _field(body, "lora_name", str)
        with self._lock:
            adapter = self.adapters.get(name)
            if adapter is None or not adapter.loaded:
                loaded = sorted(self.adapter_paths)
                raise Refusal(400, f"LoRA with name {name} does not exist. Loaded LoRAs: dict_keys({loaded})", "lora")
            self.engine.unload_adapter(name)
            adapter.loaded = False
            return {"success": True, "error_message": "", "loaded_adapters": self.adapter_paths}

    def flush(self) -> None:
        """``mem_cache/flush_cache.py``: drop every cached prefix."""
        self.cache.clear()
        self.engine.flush_cache()

    def model_info(self) -> dict:
        return {
            "model_path": self.model_path,
            "served_model_name": self.served_model_name,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
        }

    def server_info(self) -> dict:
        """``utils/common.py: build_server_info``: resolved server args + the scheduler's ``get_init_info``."""
        return {
            "model_path": self.model_path,
            "served_model_name": self.served_model_name,
            "context_length": self.context_length,
            "enable_deterministic_inference": self.deterministic,
            "enable_cache_report": self.cache_report,
            "enable_lora": True,
            "speculative_algorithm": None,
            "status": "ready",
            "max_total_num_tokens": self.kv_capacity,
            "max_req_input_len": self.max_req_input_len,
            "version": "0.5.23",
            "frontend": "python",
        }

    def models(self) -> dict:
        """``entrypoints/http_server.py: available_models``: adapters listed under their ``lora_name``."""
        cards = [
            {
                "id": self.served_model_name,
                "object": "model",
                "owned_by": "sglang",
                "root": self.served_model_name,
                "parent": None,
                "max_model_len": self.context_length,
            }
        ]
        for name, path in self.adapter_paths.items():
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "sglang",
                    "root": path,
                    "parent": self.served_model_name,
                    "max_model_len": None,
                }
            )
        return {"object": "list", "data": cards}

    def health(self) -> int:
        """``entrypoints/http_server.py: health_generate``: 503 while starting (or once the scheduler died)."""
        return 200 if self.status == "up" else 503


def _launch_id(name: str, path: str) -> str:
    """Launch-time adapters get ``uuid5(name, path)`` (``lora/lora_registry.py: LoRARef``)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{name}\0{path}").hex


def _override(result: GenerateResult, text: str, engine: Engine) -> GenerateResult:
    """The scripted adapter answer replaces the engine's (ids from the engine's own tokenizer, no eos)."""
    ids = engine.encode(text)
    return GenerateResult(
        text=text, output_ids=ids, finish_reason="stop", prompt_tokens=result.prompt_tokens, completion_tokens=len(ids)
    )


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


def _meta_info(result: GenerateResult, finish: dict[str, Any]) -> dict:
    return {
        "id": uuid.uuid4().hex,
        "finish_reason": finish,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens or 0,
    }


def _abort_meta(fault: Fault) -> dict:
    """``managers/schedule_batch.py: FINISH_ABORT.to_json`` for an abort without an HTTP status."""
    return {
        "id": uuid.uuid4().hex,
        "finish_reason": {"type": "abort", "message": fault.message, "status_code": None, "err_type": None},
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
    }


def _field(body: Any, key: str, kind: type, default: Any = ..., contract: bool = False) -> Any:
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
    top_k = _field(params, "top_k", int, -1, contract)
    sampling = SamplingParams(
        temperature=_field(params, "temperature", float, 1.0, contract),
        top_p=_field(params, "top_p", float, 1.0, contract),
        top_k=-1 if top_k >= TOP_K_ALL else top_k,
        min_p=_field(params, "min_p", float, 0.0, contract),
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
    max_new = _field(params, max_tokens_key, int, default_max, contract)
    if max_new < 0:
        raise Refusal(400, f"max_new_tokens must be at least 0, got {max_new}.")
    extra = {"max_new_tokens": max(1, max_new), "stop": stop, "seed": params.get("sampling_seed", params.get("seed"))}
    return extra, sampling


def _parse_generate(body: Any) -> tuple[GenerateRequest, bool, bool]:
    if not isinstance(body, dict):
        raise Refusal(400, "invalid type: expected struct GenerateRequest", "contract")
    params = _field(body, "sampling_params", dict, {}, contract=True)
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
    adapter = _field(body, "lora_path", str, None, contract=True)
    # managers/tokenizer_manager.py: _tokenize_one_request takes input_ids when both are given
    prompt = {"input_ids": body["input_ids"]} if has_ids else {"text": body["text"]}
    return (
        GenerateRequest(sampling=sampling, adapter=adapter, **prompt, **extra),
        _field(params, "skip_special_tokens", bool, True, True),
        _field(params, "no_stop_trim", bool, False, True),
    )


def _parse_completion(body: Any, served: str) -> tuple[GenerateRequest, bool, bool]:
    model = _field(body, "model", str)
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
    adapter = parse_model_adapter(model, served) or _field(body, "lora_path", str, None)
    return (
        GenerateRequest(sampling=sampling, adapter=adapter, **prompt_field, **extra),
        _field(body, "skip_special_tokens", bool, True),
        _field(body, "no_stop_trim", bool, False),
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


_FLUSHED = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


class _Handler(QuietHandler):
    # headers and body are two writes: without TCP_NODELAY a keep-alive client can stall on a delayed ACK
    disable_nagle_algorithm = True
    server_state: SGLangTestServer

    def do_GET(self) -> None:
        s = self.server_state
        self._dispatch(
            {
                "/health": lambda _: s.health(),
                "/health_generate": lambda _: s.health(),
                "/ready": lambda _: s.health(),
                "/model_info": lambda _: s.model_info(),
                "/get_model_info": lambda _: s.model_info(),
                "/server_info": lambda _: s.server_info(),
                "/get_server_info": lambda _: s.server_info(),
                "/v1/models": lambda _: s.models(),
                "/flush_cache": self._flush,
            }
        )

    def do_POST(self) -> None:
        s = self.server_state
        self._dispatch(
            {
                "/generate": s.handle_generate,
                "/v1/completions": s.handle_completions,
                "/flush_cache": self._flush,
                "/load_lora_adapter": s.handle_load_adapter,
                "/unload_lora_adapter": s.handle_unload_adapter,
            }
        )

    def _flush(self, _: Any) -> str:
        self.server_state.flush()
        return _FLUSHED

    def _dispatch(self, routes: dict[str, Callable[[Any], Any]]) -> None:
        state = self.server_state
        path = self.path.split("?", 1)[0]
        openai_route = path.startswith("/v1/")
        with state._lock:
            state.requests[path] += 1
        body = self._read_body()
        if path not in routes:
            return self._send(404, {"detail": "Not Found"})
        if path in ("/generate", "/v1/completions"):
            fault = state._next_fault()
            if fault is not None and fault.kind == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return None
            if fault is not None and fault.kind == "status":
                kind = "http" if fault.status is None or fault.status >= 500 else "value"
                return self._send(
                    fault.status or 500, Refusal(fault.status or 500, fault.message, kind).body(openai_route)
                )
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
        try:
            parsed = json.loads(body) if body else {}
        except ValueError as exc:
            return self._send(400, Refusal(400, f"invalid JSON body: {exc}", "contract").body(openai_route))
        if path in ("/generate", "/v1/completions"):
            with state._lock:
                state.bodies.append(parsed)
        try:
            answer = routes[path](parsed)
        except Refusal as exc:
            return self._send(exc.status, exc.body(openai_route))
        except Exception as exc:  # an engine crash is a 500, as in a real server
            return self._send(500, Refusal(500, f"{type(exc).__name__}: {exc}", "http").body(openai_route))
        if isinstance(answer, int):  # a bare status (health probes)
            return self._send(answer, "")
        return self._send(200, answer)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout): nothing to answer


SGLangTestServer.handler_class = _Handler

__all__ = [
    "Engine",
    "Fault",
    "Refusal",
    "SAMPLING_KEYS",
    "SGLangTestServer",
    "ScriptedEngine",
    "ScriptedTokenizer",
    "parse_model_adapter",
    "shape_output",
]
