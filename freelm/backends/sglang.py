"""Client for SGLang's native ``/generate`` endpoint (HTTP only: never ``import sglang``).

Why the native endpoint and not the OpenAI one: it takes ``input_ids`` (the loop
keeps exact token ids so the radix cache matches after a deletion), returns
``output_ids`` and always reports ``cached_tokens``.

Request mapping (checked against sglang ``api/v1/api_types.py`` and
``srt/sampling/sampling_params.py``): ``sampling_params`` is validated strictly
by SGLang (unknown keys -> HTTP 400), so only documented keys are sent:

* ``temperature``, ``top_p``, ``top_k``, ``min_p`` always (SGLang otherwise falls
  back to the model's generation_config); ``top_k=-1`` ("off") is sent as
  ``1073741824``, the API's own "whole vocabulary" value, accepted by every version;
* ``sampling_seed`` only when the request has a seed;
* ``skip_special_tokens: false`` so ``</think>`` and ``<|im_end|>`` survive in ``text``;
* ``no_stop_trim: true`` so ``text == decode(output_ids)``: by default SGLang cuts
  the matched stop string from ``text`` and drops a matched stop token before
  decoding, which would desynchronise the loop's text from its token ids.

``lora_path`` is the adapter NAME (``--lora-paths NAME=PATH``), omitted for the base model.

Transport: aiohttp, one session per backend. httpx/httpcore cost about 2 ms of
client CPU per request at 256 in flight (connection-pool bookkeeping that grows
with the connections of a pool) against about 0.5 ms for aiohttp; at 0.1 s per
request that decided whether the client or the server was the bottleneck
(``bench/runner_bench.py``, docs/runner.md).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from freelm.backends import BackendArgs, BackendKind, register_backend
from freelm.backends.base import (
    BackendError,
    ContextWindow,
    GenerateRequest,
    GenerateResult,
    ServerLimits,
    TransientBackendError,
    check_length,
    refused,
)
from freelm.http_limits import ReplyTooLarge, probe_timeout, read_capped, reply_limit

if TYPE_CHECKING:
    import aiohttp  # imported where a backend is built: discovering the kinds (the runner's --help) does not pay for it

#: SGLang's "top_k off" in the API contract (``TOP_K_ALL = 1 << 30``).
TOP_K_ALL = 1 << 30


def generate_payload(request: GenerateRequest) -> dict[str, Any]:
    """The ``/generate`` JSON body for one request."""
    s = request.sampling
    params: dict[str, Any] = {
        "max_new_tokens": request.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": TOP_K_ALL if s.top_k < 1 else s.top_k,
        "min_p": s.min_p,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if request.stop:
        params["stop"] = list(request.stop)
    if request.seed is not None:
        params["sampling_seed"] = request.seed
    body: dict[str, Any] = {"sampling_params": params}
    if request.input_ids is not None:
        body["input_ids"] = list(request.input_ids)
    else:
        body["text"] = request.text
    if request.adapter is not None:
        body["lora_path"] = request.adapter
    return body


def parse_generate_response(data: Any, endpoint: str) -> GenerateResult:
    """Turn one ``/generate`` response object into a result; an ``abort`` finish is a BackendError."""
    if not isinstance(data, dict) or not isinstance(data.get("meta_info"), dict):
        raise BackendError(f"{endpoint}: malformed /generate response (no meta_info): {str(data)[:200]}")
    meta = data["meta_info"]
    finish = meta.get("finish_reason") or {}
    if not isinstance(finish, dict):  # a bare "stop" / "abort" string
        finish = {"type": finish}
    kind = finish.get("type")
    if kind == "abort":
        status = finish.get("status_code")
        message = f"{endpoint}: generation aborted (status {status}): {finish.get('message')}"
        raise refused(message, str(finish.get("message")), status)
    if kind not in ("stop", "length"):
        raise BackendError(f"{endpoint}: unexpected finish_reason {finish!r}")
    try:
        return GenerateResult(
            text=str(data.get("text", "")),
            output_ids=[int(t) for t in data.get("output_ids") or []],
            finish_reason=kind,
            prompt_tokens=int(meta["prompt_tokens"]),
            completion_tokens=int(meta["completion_tokens"]),
            cached_tokens=None if meta.get("cached_tokens") is None else int(meta["cached_tokens"]),
            endpoint=endpoint,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendError(f"{endpoint}: malformed /generate meta_info {meta!r}: {exc}") from exc


#: EAGLE-family algorithms reserve output slots on top of every input (``managers/utils.py``).
_EAGLE_ALGORITHMS = ("EAGLE", "EAGLE3", "FROZEN_KV_MTP")


def parse_server_info(info: Any, endpoint: str) -> ServerLimits:
    """SGLang's ``/server_info``: the resolved server args plus the scheduler's ``max_req_input_len``.

    ``context_length`` is null when the model's config.json decides it; then
    ``max_req_input_len`` alone bounds the window (``managers/tp_worker.py``:
    ``max_req_input_len = min(context_len - 1, kv_capacity - 1) - 5``).
    """
    if not isinstance(info, dict):
        raise BackendError(f"{endpoint}/server_info: expected a JSON object, got {str(info)[:200]}")

    def number(key: str) -> int | None:
        value = info.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    max_input = number("max_req_input_len")
    context = number("context_length") or (max_input + 6 if max_input else None)
    reserved = 0
    if str(info.get("speculative_algorithm") or "").upper() in _EAGLE_ALGORITHMS:
        steps = (number("speculative_eagle_topk") or 1) * (number("speculative_num_steps") or 0)
        reserved = max(
            steps, number("speculative_num_draft_tokens") or 0, number("max_speculative_num_draft_tokens") or 0
        )
    window = None
    if context is not None:
        window = ContextWindow.sglang(context, max_input, reserved, source=f"{endpoint}/server_info")
    deterministic = info.get("enable_deterministic_inference")
    return ServerLimits(
        window=window,
        seeds_honoured=bool(deterministic) if isinstance(deterministic, bool) else None,
        cache_report=info.get("enable_cache_report") if isinstance(info.get("enable_cache_report"), bool) else None,
        min_p_forbidden=deterministic is True,
        source=f"{endpoint}/server_info",
    )


@dataclass
class Reply:
    """A finished HTTP response, read in full (the client never streams)."""

    url: str
    status_code: int
    text: str

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json.loads(self.text)


def error_message(response: Reply) -> str:
    """The server's own error text, from any of SGLang's error bodies (``entrypoints/http_server.py``).

    ``{"error": "..."}`` (schema violations), ``{"error": {"message": ...}}``
    (ValueErrors), ``{"object": "error", "message": ...}`` (HTTP exceptions),
    ``{"success": false, "error_message": ...}`` (LoRA load/unload), FastAPI's ``{"detail": ...}``.
    """
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        for key in ("message", "detail", "error_message", "error"):
            if key in body:
                return str(body[key])
    return str(body)[:500]


class SGLangBackend:
    """One SGLang server. Retries connection errors, timeouts and 5xx with jittered exponential backoff."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 600.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        name: str | None = None,
        max_connections: int = 512,
    ):
        self.base_url = base_url.rstrip("/")
        self.name = name or f"sglang@{self.base_url}"
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_connections = max(1, max_connections)
        import aiohttp

        # A long generation is one request: the total timeout is the whole call (the body read included),
        # connect fails fast; health and start-up questions get a total of seconds (probe_timeout)
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self.probe_timeout = aiohttp.ClientTimeout(total=probe_timeout(timeout), sock_connect=min(timeout, 10.0))
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._readiness: bool | None = None  # whether GET /readiness exists (a model gateway), once probed
        self.health_error: str | None = None  # why the last health probe failed, for the operator

    def _client(self) -> aiohttp.ClientSession:
        """The session of the running event loop (a session is bound to the loop it was made in)."""
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
            self._session_loop = loop
        return self._session

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        start = time.perf_counter()
        limit = reply_limit(request.max_new_tokens)
        response = await self._request("POST", "/generate", json=generate_payload(request), limit=limit)
        result = check_length(request, parse_generate_response(_json(response), self.base_url))
        result.latency_s = time.perf_counter() - start
        return result

    async def health(self) -> bool:
        """True when the server can generate.

        An SGLang server's ``GET /health`` runs a 1-token generation. SGLang's
        model gateway (``sglang_router``) answers ``/health`` as a liveness alias
        (always 200, even with no worker up) and reports its workers on
        ``GET /readiness`` (503 when none is healthy), which a plain server does
        not have (404): so ``/readiness`` is asked first, once, and used when it exists.
        """
        import aiohttp

        try:
            if self._readiness is not False:
                response = await self._send("GET", "/readiness", timeout=self.probe_timeout)
                self._readiness = response.status_code != 404
            if not self._readiness:
                response = await self._send("GET", "/health", timeout=self.probe_timeout)
        except asyncio.TimeoutError:  # first: aiohttp's ServerTimeoutError is a ClientError too
            self.health_error = f"{self.base_url}: no answer within {self.probe_timeout.total:g}s"
            return False
        except (aiohttp.ClientError, ReplyTooLarge) as exc:
            self.health_error = f"{self.base_url}: {type(exc).__name__}: {exc}".rstrip(": ")
            return False
        ok = response.status_code == 200
        self.health_error = None if ok else f"{response.url}: HTTP {response.status_code}: {error_message(response)}"
        return ok

    async def model_info(self) -> dict[str, Any]:
        return _json(await self._request("GET", "/model_info", timeout=self.probe_timeout))

    async def server_limits(self) -> ServerLimits:
        """The served window, seed and cache-report settings, from ``GET /server_info``."""
        reply = await self._request("GET", "/server_info", timeout=self.probe_timeout)
        return parse_server_info(_json(reply), self.base_url)

    async def startup_check(self, adapters: Sequence[str | None], probe_ids: Sequence[int] = ()) -> dict[str, Any]:
        """Every adapter the run calls is loaded here, from ``GET /v1/models``; returns the models listed.

        SGLang lists each loaded LoRA as a card named by its ``lora_name``
        (``entrypoints/http_server.py: available_models``). Without the check an
        unloaded name fails every cleaning call instead of the start. The base
        model is always served, and ``/generate`` takes token ids, so
        ``probe_ids`` have nothing to learn here.
        """
        listing = await self._request("GET", "/v1/models", timeout=self.probe_timeout)
        served = [card.get("id") for card in _cards(_json(listing), self.base_url)]
        for adapter in dict.fromkeys(a for a in adapters if a is not None):
            if adapter not in served:
                raise BackendError(
                    f"{self.base_url}: the cleaner's adapter {adapter!r} is not loaded here; /v1/models lists "
                    f"{served}. Load it (--lora-paths {adapter}=PATH, or POST /load_lora_adapter) or point "
                    "--cleaner-endpoint at a server that has it"
                )
        return {"models": served}

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load a LoRA directory (on the server's disk) under ``name`` into the running server."""
        return _json(await self._request("POST", "/load_lora_adapter", json={"lora_name": name, "lora_path": path}))

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        return _json(await self._request("POST", "/unload_lora_adapter", json={"lora_name": name}))

    async def flush_cache(self) -> None:
        """Drop the radix cache (SGLang refuses while requests run: that is a 400 BackendError)."""
        await self._request("POST", "/flush_cache")

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def _send(self, method: str, path: str, *, limit: int | None = None, **kwargs: Any) -> Reply:
        """One exchange; the body is read under ``limit`` bytes (:func:`~freelm.http_limits.reply_limit`)."""
        url = f"{self.base_url}{path}"
        async with self._client().request(method, url, **kwargs) as response:
            body = await read_capped(response, reply_limit() if limit is None else limit)
            return Reply(url, response.status, body.decode("utf-8", errors="replace"))

    async def _request(self, method: str, path: str, **kwargs: Any) -> Reply:
        """One call with retries; 4xx fails at once with the server's message; an over-size reply is transient."""
        import aiohttp

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: retries of many rollouts spread out
            try:
                response = await self._send(method, path, **kwargs)
            except asyncio.TimeoutError:  # aiohttp's timeouts subclass it (not the builtin before 3.11)
                last = f"timeout: no complete reply within {kwargs.get('timeout', self.timeout).total:g}s"
                continue
            except aiohttp.ClientError as exc:
                last = f"connection error ({type(exc).__name__}: {exc})"
                continue
            except ReplyTooLarge as exc:
                last = str(exc)
                continue
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}: {error_message(response)}"
                continue
            if response.status_code >= 400:
                message = error_message(response)
                raise refused(
                    f"{self.base_url}{path}: HTTP {response.status_code}: {message}", message, response.status_code
                )
            return response
        raise TransientBackendError(f"{self.base_url}{path}: failed after {self.max_retries + 1} attempts: {last}")


def _cards(body: Any, endpoint: str) -> list[dict[str, Any]]:
    """The model cards of an OpenAI-style ``/v1/models`` listing; BackendError when it is not one."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or not all(isinstance(card, dict) for card in data):
        raise BackendError(f"{endpoint}/v1/models: expected {{'data': [model cards]}}, got {str(body)[:200]}")
    return data


def _json(response: Reply) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise BackendError(f"{response.url}: response is not JSON: {response.text[:200]!r}") from exc


def _runner_options(args: BackendArgs) -> dict[str, Any]:
    return {
        "base_url": args.url, "timeout": args.timeout, "max_retries": args.max_retries,
        "max_connections": max(512, args.concurrency),
    }  # fmt: skip


register_backend(
    BackendKind("sglang", SGLangBackend, remote=True, options=_runner_options, help="SGLang native /generate", order=0)
)
