"""A real HTTP server speaking SGLang 0.5.23's protocol, for tests and benchmarks (SGLang itself cannot run on CPU).

Every rule it applies is SGLang 0.5.23's, read in the released wheel, and names
the file it comes from (paths under ``sglang/srt/``); docs/backends.md keeps the
table of rules with the module and the test of each. When this stand-in and
SGLang differ, the stand-in is the bug.

Endpoints (``entrypoints/http_server.py``): ``POST /generate``, ``GET /health``,
``/health_generate``, ``/ready``, ``/model_info``, ``/server_info``, ``POST
/flush_cache``, ``/load_lora_adapter``, ``/unload_lora_adapter``, ``POST
/v1/completions``, ``GET /v1/models``. The rules are split by concern:
this module keeps the ones that need server state, :meth:`SGLangTestServer._admit`
(window, LoRA, seeds), the adapter registry and the endpoints' answers;
:mod:`freelm.testing.sglang_protocol` parses requests and shapes responses
(typed fields, sampling checks, stop trimming, the four error bodies);
:mod:`freelm.testing.sglang_faults` holds the scripted faults;
:class:`~freelm.testing.radix_cache.RadixCache` computes ``cached_tokens``.

Threads (:mod:`freelm.testing.http_server`): 256 concurrent rollouts are 256
mostly-sleeping threads, and the "dropped connection" fault closes a socket
mid-request in one call.

The engine is pluggable (:class:`~freelm.testing.engines.Engine`):
:class:`freelm.backends.local.LocalBackend` or
:class:`~freelm.testing.engines.ScriptedEngine` (fixed delay, scripted text per
adapter, no model).
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
from typing import Any, Literal

from freelm.backends.base import BackendError, GenerateRequest, GenerateResult
from freelm.testing.engines import Engine
from freelm.testing.http_server import LocalHTTPServer, QuietHandler
from freelm.testing.radix_cache import RadixCache
from freelm.testing.sglang_faults import Fault, FaultQueue, overlong_result, override_result
from freelm.testing.sglang_protocol import (
    Refusal,
    meta_info,
    parse_completion,
    parse_generate,
    shape_output,
    typed_field,
)

#: ``sampling/sampling_batch_info.py``: under deterministic inference an unseeded request samples with seed 42.
DEFAULT_DETERMINISTIC_SEED = 42


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
        self.faults = FaultQueue()
        self._answering = threading.Event()
        self._answering.set()
        self._closing = False
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
        self.faults.clear()
        with self._lock:
            self.requests: Counter[str] = Counter()
            self.adapter_requests: Counter[str | None] = Counter()
            self.max_in_flight = self.in_flight  # requests of an earlier test may still be running
            self.bodies: deque[dict] = deque(maxlen=1000)
            self.engine_requests: deque[GenerateRequest] = deque(maxlen=1000)

    def finish_starting(self) -> None:
        """The server is up: ``/health`` and ``/ready`` answer 200 from now on."""
        self.status = "up"

    def fail_next(self, status: int = 503, message: str = "scripted server error", times: int = 1) -> None:
        self.faults.add(Fault("status", status=status, message=message), times)

    def drop_next(self, times: int = 1) -> None:
        self.faults.add(Fault("drop"), times)

    def delay_next(self, seconds: float, times: int = 1) -> None:
        self.faults.add(Fault("delay", seconds=seconds), times)

    def abort_next(self, message: str = "Aborted", status: int | None = None, times: int = 1) -> None:
        """The scheduler aborts the next request (``managers/schedule_batch.py: FINISH_ABORT``)."""
        self.faults.add(Fault("abort", status=status, message=message), times)

    def endless_body_next(self, times: int = 1) -> None:
        """The next request gets a 200 whose body never ends (until the client hangs up or the server stops)."""
        self.faults.add(Fault("endless_body"), times)

    def drip_next(self, seconds_per_byte: float = 1.0, times: int = 1) -> None:
        """The next request gets its normal answer, one byte every ``seconds_per_byte``."""
        self.faults.add(Fault("drip", seconds=seconds_per_byte), times)

    def overlong_next(self, tokens: int, times: int = 1) -> None:
        """The next request gets a well-formed 200 with ``tokens`` output ids, whatever it asked for."""
        self.faults.add(Fault("overlong", tokens=tokens), times)

    def stop_answering(self) -> None:
        """From now on every request, on every path (health included), is read and never answered."""
        self._answering.clear()

    def resume_answering(self) -> None:
        """Requests held by :meth:`stop_answering` are answered, and new ones too."""
        self._answering.set()

    def stop(self) -> None:
        self._closing = True  # held requests and endless bodies end without an answer
        self._answering.set()
        super().stop()

    def override_next_adapter_output(self, text: str, times: int = 1) -> None:
        """The next adapter (cleaning) call answers ``text`` verbatim (e.g. malformed JSON) instead of the engine's."""
        self.faults.add_override(text, times)

    # ----- request handling (called from handler threads) -----------------

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

    def _run(
        self, request: GenerateRequest, fault: Fault | None = None
    ) -> tuple[GenerateResult, GenerateRequest, bool]:
        """Admit, run the engine, cache; also returns the request as scheduled, and whether an override answered.

        An ``overlong`` ``fault`` replaces the engine's answer after it ran (and is not cached).
        """
        with self._lock:
            if self.status != "up":
                raise Refusal(503, "the server is not up", kind="http")
            scheduled = self._admit(request)
            self.adapter_requests[request.adapter] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.engine_requests.append(scheduled)
            override = self.faults.next_override() if request.adapter else None
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
                result = override_result(result, override, self.engine, scheduled.max_new_tokens)
            self.cache.insert(namespace, prompt + result.output_ids[:-1])
            result = replace(result, cached_tokens=cached, prompt_tokens=len(prompt))
            if fault is not None and fault.kind == "overlong":
                return overlong_result(result, fault.tokens, self.engine), scheduled, True
            return result, scheduled, override is not None
        finally:
            with self._lock:
                self.in_flight -= 1

    def handle_generate(self, body: Any) -> dict:
        request, skip_special, no_trim = parse_generate(body)
        fault = self._reply_fault()
        if fault is not None and fault.kind == "abort":
            return {"text": "", "output_ids": [], "meta_info": fault.abort_meta()}
        result, scheduled, overridden = self._run(request, fault)
        text, finish = shape_output(result, scheduled, self.engine, skip_special, no_trim, overridden)
        return {"text": text, "output_ids": result.output_ids, "meta_info": meta_info(result, finish)}

    def handle_completions(self, body: Any) -> dict:
        request, skip_special, no_trim = parse_completion(body, self.served_model_name)
        fault = self._reply_fault()
        if fault is not None and fault.kind == "abort":
            choice_finish = "abort"
            result = GenerateResult(text="", output_ids=[], finish_reason="stop", prompt_tokens=0, completion_tokens=0)
            text = ""
        else:
            result, scheduled, overridden = self._run(request, fault)
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

    def _reply_fault(self) -> Fault | None:
        """A queued fault that shapes the answer; an ``abort`` with a status is raised as its refusal."""
        fault = self.faults.next_reply()
        refusal = fault.abort_refusal() if fault is not None and fault.kind == "abort" else None
        if refusal is not None:
            raise refusal
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
        name, path = typed_field(body, "lora_name", str), typed_field(body, "lora_path", str)
        with self._lock:
            if name in self.adapters and self.adapters[name].loaded:
                # lora/lora_manager.py: load_lora_adapter
                raise Refusal(400, f"Failed to load LoRA adapter {name} because it is already loaded", kind="lora")
            self._load(name, path)
            return {"success": True, "error_message": "", "loaded_adapters": self.adapter_paths}

    def handle_unload_adapter(self, body: Any) -> dict:
        """``lora/lora_registry.py: unregister``; the name stays in ``lora_ref_cache`` for an implicit reload."""
        name = typed_field(body, "lora_name", str)
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
        while not state._answering.wait(0.05):  # stop_answering(): read, then silence
            pass
        if state._closing:
            return self._hang_up()
        if path not in routes:
            return self._send(404, {"detail": "Not Found"})
        fault = state.faults.next_transport() if path in ("/generate", "/v1/completions") else None
        if fault is not None and fault.kind == "drop":
            return self._hang_up()
        if fault is not None and fault.kind == "status":
            refusal = fault.status_refusal()
            return self._send(refusal.status, refusal.body(openai_route))
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "endless_body":
            return self._send_endless()
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
        return self._send(200, answer, seconds_per_byte=fault.seconds if fault and fault.kind == "drip" else 0.0)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _hang_up(self) -> None:
        """Close the connection without a response."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, payload: Any, seconds_per_byte: float = 0.0) -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not seconds_per_byte:
                return self.wfile.write(data)
            for byte in data:  # drip
                if self.server_state._closing:
                    return self._hang_up()
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(seconds_per_byte)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout): nothing to answer

    def _send_endless(self) -> None:
        """A 200 with no ``Content-Length`` whose JSON body goes on until the client hangs up (or the server stops)."""
        self.close_connection = True
        chunk = b"a" * (1 << 16)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"text": "')
            while not self.server_state._closing:
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client hung up: what a capped reader does


SGLangTestServer.handler_class = _Handler

__all__ = ["SGLangTestServer"]
