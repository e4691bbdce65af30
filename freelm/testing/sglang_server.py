"""A real HTTP server speaking SGLang's protocol, for tests and benchmarks (SGLang itself cannot run on CPU).

Endpoints (shapes as in sglang ``srt/entrypoints/http_server.py`` 0.5.x):
``POST /generate``, ``GET /health``, ``GET /ready``, ``GET /model_info``,
``POST /flush_cache``, ``POST /load_lora_adapter``, ``POST /unload_lora_adapter``,
``POST /v1/completions``, ``GET /v1/models``.

Validation mirrors SGLang's: exactly one of ``text`` / ``input_ids``; unknown
``sampling_params`` keys -> 400 naming the key (serde's wording, like the API
contract); a ``lora_path`` that was never loaded -> 400 "Got LoRA adapter that
has never been loaded"; with ``context_length`` set, a prompt that fills it or a
prompt + ``max_new_tokens`` that reaches it -> 400, as in SGLang's
``_validate_one_request``; OpenAI ``model`` is parsed as ``<served>:<adapter>``.

Threads (:mod:`freelm.testing.http_server`): 256 concurrent rollouts are 256
mostly-sleeping threads, and the "dropped connection" fault closes a socket
mid-request in one call.

The engine is pluggable (:class:`Engine`): :class:`freelm.backends.local.LocalBackend`
or :class:`ScriptedEngine` (fixed delay, scripted text per adapter, no model).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from freelm.backends.base import BackendError, GenerateRequest, GenerateResult, SamplingParams
from freelm.testing.http_server import LocalHTTPServer, QuietHandler

#: The keys SGLang's API contract accepts inside ``sampling_params`` (sglang ``api/v1/api_types.py``).
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


class Engine(Protocol):
    """What the server needs from a model. ``generate_blocking`` may block; it is called from handler threads.

    ``text`` in the result is the untrimmed decoding with special tokens kept;
    the server applies ``no_stop_trim`` / ``skip_special_tokens`` itself via ``decode``.
    Unknown adapters and bad requests raise :class:`BackendError` (-> HTTP 400).
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
    ends every answer that fits in ``max_new_tokens``. ``cached_tokens`` is the
    longest common prefix with the last few prompts of the same adapter, as a
    radix cache would report it. A ``stop`` string in the scripted text ends the answer there.
    """

    EOS_ID = 1
    ID_OFFSET = 2
    EOS_TEXT = "<|im_end|>"

    def __init__(self, outputs: dict[str | None, Script] | None = None, *, delay: float = 0.0, history: int = 8):
        self.outputs: dict[str | None, Script] = dict(outputs or {None: "Let me think. \\boxed{0}"})
        self.delay = delay
        self._history: dict[str | None, deque[list[int]]] = {}
        self._history_len = history
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
                raise BackendError(f"adapter {name!r} is already loaded; unload it first")
            self._loaded.append(name)
            self._history.pop(name, None)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._loaded:
                raise BackendError(f"adapter {name!r} is not loaded (loaded: {self.adapter_names})")
            self._loaded.remove(name)
            self._history.pop(name, None)

    def flush_cache(self) -> None:
        with self._lock:
            self._history.clear()

    def generate_blocking(self, request: GenerateRequest) -> GenerateResult:
        if request.adapter is not None and request.adapter not in self._loaded:
            raise BackendError(f"Got LoRA adapter that has never been loaded: {request.adapter!r}")
        script = self.outputs.get(request.adapter, self.outputs.get(None, ""))
        answer = script(request) if callable(script) else script
        prompt = list(request.input_ids) if request.input_ids is not None else self.encode(request.text or "")
        with self._lock:
            past = self._history.setdefault(request.adapter, deque(maxlen=self._history_len))
            cached = max((len(os.path.commonprefix([p, prompt])) for p in past), default=0)
            past.append(prompt)
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
            cached_tokens=min(cached, len(prompt) - 1) if prompt else 0,
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

    ``status``: answer HTTP ``status`` with ``message``; ``drop``: close the
    socket without answering; ``delay``: sleep ``seconds`` first, then answer
    normally (past a short client timeout).
    """

    kind: Literal["status", "drop", "delay"]
    status: int = 503
    message: str = "scripted server error"
    seconds: float = 0.0


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class SGLangTestServer(LocalHTTPServer):
    """``with SGLangTestServer(engine) as srv: ... srv.url``: a background-thread server on 127.0.0.1.

    Counters for routing assertions: ``requests`` (Counter by path),
    ``adapter_requests`` (Counter by adapter name, ``None`` = base),
    ``in_flight`` / ``max_in_flight`` (generation requests), and ``bodies``
    (the last 1000 generation request bodies as parsed JSON). ``context_length``
    (None = unchecked) is the served window SGLang validates requests against.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        adapters: dict[str, str] | None = None,
        served_model_name: str = "freelm-test",
        model_path: str = "",
        context_length: int | None = None,
    ):
        self.engine = engine
        self.context_length = context_length
        self.served_model_name = served_model_name
        self.model_path = model_path or served_model_name
        self.adapter_paths: dict[str, str] = {name: "" for name in engine.adapter_names}
        for name, path in (adapters or {}).items():
            engine.load_adapter(name, path)
            self.adapter_paths[name] = str(path)
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._adapter_overrides: deque[str] = deque()
        self.in_flight = 0
        self.reset()

    @property
    def url(self) -> str:
        return self.origin

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

    def fail_next(self, status: int = 503, message: str = "scripted server error", times: int = 1) -> None:
        self._queue(Fault("status", status=status, message=message), times)

    def drop_next(self, times: int = 1) -> None:
        self._queue(Fault("drop"), times)

    def delay_next(self, seconds: float, times: int = 1) -> None:
        self._queue(Fault("delay", seconds=seconds), times)

    def override_next_adapter_output(self, text: str, times: int = 1) -> None:
        """The next adapter (cleaning) call answers ``text`` verbatim (e.g. malformed JSON) instead of the engine's."""
        with self._lock:
            self._adapter_overrides.extend([text] * times)

    def _queue(self, fault: Fault, times: int) -> None:
        with self._lock:
            self._faults.extend([fault] * times)

    # ----- request handling (called from handler threads) -----------------

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _check_context(self, request: GenerateRequest) -> None:
        """SGLang's length checks, with its wording: the prompt + ``max_new_tokens`` must stay below the window."""
        if self.context_length is None:
            return
        n = len(request.input_ids) if request.input_ids is not None else len(self.engine.encode(request.text or ""))
        if n >= self.context_length:
            raise _HTTPError(
                400, f"The input ({n} tokens) is longer than the model's context length ({self.context_length} tokens)."
            )
        if n + request.max_new_tokens >= self.context_length:
            raise _HTTPError(
                400,
                f"Requested token count exceeds the model's maximum context length of {self.context_length} tokens. "
                f"You requested a total of {n + request.max_new_tokens} tokens: {n} tokens from the input messages "
                f"and {request.max_new_tokens} tokens for the completion.",
            )

    def _run(self, request: GenerateRequest) -> tuple[GenerateResult, bool]:
        """Run the engine; True in the second slot when a scripted override replaced its answer."""
        self._check_context(request)
        with self._lock:
            self.adapter_requests[request.adapter] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            override = self._adapter_overrides.popleft() if request.adapter and self._adapter_overrides else None
        try:
            if request.adapter is not None and request.adapter not in self.adapter_paths:
                raise _HTTPError(400, f"Got LoRA adapter that has never been loaded: {request.adapter}")
            try:
                result = self.engine.generate_blocking(request)
            except BackendError as exc:
                raise _HTTPError(400, str(exc)) from exc
            if override is not None:
                return _override(result, override, self.engine), True
            return result, False
        finally:
            with self._lock:
                self.in_flight -= 1

    def _shape_text(
        self, result: GenerateResult, request: GenerateRequest, skip_special: bool, no_trim: bool, overridden: bool
    ) -> str:
        """SGLang's detokenizer: drop a matched stop token and cut at a matched stop string unless no_stop_trim."""
        ids = result.output_ids
        eos_matched = (
            result.finish_reason == "stop" and not overridden and not _stop_string_in(result.text, request.stop)
        )
        if ids and eos_matched and not no_trim:
            ids = ids[:-1]
        text = self.engine.decode(ids, skip_special_tokens=skip_special)
        if not no_trim and result.finish_reason == "stop":
            cut = [text.find(s) for s in request.stop if s and s in text]
            if cut:
                text = text[: min(cut)]
        return text

    def handle_generate(self, body: Any) -> dict:
        request, skip_special, no_trim = _parse_generate(body)
        result, overridden = self._run(request)
        return {
            "text": self._shape_text(result, request, skip_special, no_trim, overridden),
            "output_ids": result.output_ids,
            "meta_info": _meta_info(result),
        }

    def handle_completions(self, body: Any) -> dict:
        request, skip_special, no_trim = _parse_completion(body, self.served_model_name)
        result, overridden = self._run(request)
        cached = result.cached_tokens or 0
        return {
            "id": uuid.uuid4().hex,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "text": self._shape_text(result, request, skip_special, no_trim, overridden),
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }

    def handle_load_adapter(self, body: Any) -> dict:
        name, path = _field(body, "lora_name", str), _field(body, "lora_path", str)
        try:
            self.engine.load_adapter(name, path)
        except BackendError as exc:
            raise _HTTPError(400, str(exc)) from exc
        self.adapter_paths[name] = path
        return {"success": True, "error_message": "", "loaded_adapters": dict(self.adapter_paths)}

    def handle_unload_adapter(self, body: Any) -> dict:
        name = _field(body, "lora_name", str)
        if name not in self.adapter_paths:
            raise _HTTPError(400, f"LoRA adapter {name} is not loaded")
        self.engine.unload_adapter(name)
        del self.adapter_paths[name]
        return {"success": True, "error_message": "", "loaded_adapters": dict(self.adapter_paths)}

    def model_info(self) -> dict:
        return {
            "model_path": self.model_path,
            "served_model_name": self.served_model_name,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
        }

    def models(self) -> dict:
        cards = [{"id": self.served_model_name, "object": "model", "root": self.model_path, "parent": None}]
        for name, path in self.adapter_paths.items():
            cards.append(
                {
                    "id": f"{self.served_model_name}:{name}",
                    "object": "model",
                    "root": path or name,
                    "parent": self.served_model_name,
                }
            )
        return {"object": "list", "data": cards}


def _override(result: GenerateResult, text: str, engine: Engine) -> GenerateResult:
    """The scripted adapter answer replaces the engine's (ids from the engine's own tokenizer, no eos)."""
    ids = engine.encode(text)
    return GenerateResult(
        text=text,
        output_ids=ids,
        finish_reason="stop",
        prompt_tokens=result.prompt_tokens,
        completion_tokens=len(ids),
        cached_tokens=result.cached_tokens,
    )


def _stop_string_in(text: str, stop: list[str]) -> bool:
    return any(s and s in text for s in stop)


def _meta_info(result: GenerateResult) -> dict:
    if result.finish_reason == "length":
        finish: dict[str, Any] = {"type": "length", "length": result.completion_tokens}
    else:
        finish = {"type": "stop", "matched": result.output_ids[-1] if result.output_ids else None}
    return {
        "id": uuid.uuid4().hex,
        "finish_reason": finish,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens or 0,
    }


def _field(body: Any, key: str, kind: type, default: Any = ...) -> Any:
    if not isinstance(body, dict):
        raise _HTTPError(400, "request body must be a JSON object")
    if key not in body or body[key] is None:
        if default is ...:
            raise _HTTPError(400, f"missing field `{key}`")
        return default
    value = body[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _HTTPError(400, f"invalid type for `{key}`: {type(value).__name__}, expected {kind.__name__}")
    return value


def _sampling(params: dict, max_tokens_key: str, default_max: int) -> tuple[dict, SamplingParams]:
    top_k = _field(params, "top_k", int, -1)
    sampling = SamplingParams(
        temperature=_field(params, "temperature", float, 1.0),
        top_p=_field(params, "top_p", float, 1.0),
        top_k=-1 if top_k >= TOP_K_ALL else top_k,
        min_p=_field(params, "min_p", float, 0.0),
    )
    if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or not 0 <= sampling.min_p <= 1:
        raise _HTTPError(400, f"invalid sampling values: {sampling}")
    if sampling.top_k == 0 or sampling.top_k < -1:
        raise _HTTPError(400, f"top_k must be -1 (disable) or at least 1, got {sampling.top_k}.")
    stop = params.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _HTTPError(400, "`stop` must be a string or a list of strings")
    extra = {
        "max_new_tokens": _field(params, max_tokens_key, int, default_max),
        "stop": stop,
        "seed": params.get("sampling_seed", params.get("seed")),
    }
    return extra, sampling


def _make_request(prompt: dict, extra: dict, sampling: SamplingParams, adapter: str | None) -> GenerateRequest:
    try:
        return GenerateRequest(sampling=sampling, adapter=adapter, **prompt, **extra)
    except ValueError as exc:
        raise _HTTPError(400, str(exc)) from exc


def _parse_generate(body: Any) -> tuple[GenerateRequest, bool, bool]:
    if not isinstance(body, dict):
        raise _HTTPError(400, "request body must be a JSON object")
    has_text, has_ids = body.get("text") is not None, body.get("input_ids") is not None
    if has_text == has_ids:
        raise _HTTPError(400, "Either text or input_ids should be provided, but not both.")
    if has_text and not isinstance(body["text"], str) or has_ids and not _is_id_list(body["input_ids"]):
        raise _HTTPError(400, "this server takes one prompt per request: `text` a string or `input_ids` a list of ints")
    params = _field(body, "sampling_params", dict, {})
    unknown = [k for k in params if k not in SAMPLING_KEYS]
    if unknown:
        listed = ", ".join(f"`{k}`" for k in SAMPLING_KEYS)
        raise _HTTPError(400, f"unknown field `{unknown[0]}`, expected one of {listed}")
    extra, sampling = _sampling(params, "max_new_tokens", 128)
    adapter = _field(body, "lora_path", str, None)
    prompt = {"text": body["text"]} if has_text else {"input_ids": body["input_ids"]}
    return (
        _make_request(prompt, extra, sampling, adapter),
        _field(params, "skip_special_tokens", bool, True),
        _field(params, "no_stop_trim", bool, False),
    )


def _parse_completion(body: Any, served: str) -> tuple[GenerateRequest, bool, bool]:
    model = _field(body, "model", str)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt_field = {"text": prompt}
    elif _is_id_list(prompt):
        prompt_field = {"input_ids": prompt}
    else:
        raise _HTTPError(400, "this server takes one prompt per request: `prompt` a string or a list of ints")
    extra, sampling = _sampling(body, "max_tokens", 16)
    return (
        _make_request(prompt_field, extra, sampling, parse_model_adapter(model, served)),
        _field(body, "skip_special_tokens", bool, True),
        _field(body, "no_stop_trim", bool, False),
    )


def parse_model_adapter(model: str, served: str) -> str | None:
    """SGLang's ``_parse_model_parameter``: ``served`` or no colon -> base, ``served:NAME`` -> NAME."""
    if model == served or ":" not in model:
        return None
    if model.startswith(served + ":"):
        return model[len(served) + 1 :] or None
    return model.split(":", 1)[1] or None


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class _Handler(QuietHandler):
    # headers and body are two writes: without TCP_NODELAY a keep-alive client can stall on a delayed ACK
    disable_nagle_algorithm = True
    server_state: SGLangTestServer

    def do_GET(self) -> None:
        self._dispatch(
            {
                "/health": lambda _: {},
                "/health_generate": lambda _: {},
                "/ready": lambda _: {},
                "/model_info": lambda _: self.server_state.model_info(),
                "/get_model_info": lambda _: self.server_state.model_info(),
                "/v1/models": lambda _: self.server_state.models(),
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
        self.server_state.engine.flush_cache()
        return "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting requests, the operation will not be performed.)\n"

    def _dispatch(self, routes: dict[str, Callable[[Any], Any]]) -> None:
        state = self.server_state
        path = self.path.split("?", 1)[0]
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
                return self._send(fault.status, {"error": {"message": fault.message, "code": fault.status}})
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
        try:
            parsed = json.loads(body) if body else {}
        except ValueError as exc:
            return self._send(400, {"error": {"message": f"invalid JSON body: {exc}", "code": 400}})
        if path in ("/generate", "/v1/completions"):
            with state._lock:
                state.bodies.append(parsed)
        try:
            return self._send(200, routes[path](parsed))
        except _HTTPError as exc:
            if path.startswith("/v1/"):
                payload = {
                    "object": "error",
                    "message": exc.message,
                    "type": "BadRequestError",
                    "param": None,
                    "code": exc.status,
                }
            else:
                payload = {"error": {"message": exc.message, "code": exc.status}}
            return self._send(exc.status, payload)
        except Exception as exc:  # an engine crash is a 500, as in a real server
            return self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}", "code": 500}})

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
    "SAMPLING_KEYS",
    "SGLangTestServer",
    "ScriptedEngine",
    "ScriptedTokenizer",
    "parse_model_adapter",
]
