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
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import httpx

from freelm.backends.base import (
    BackendError,
    ContextWindow,
    GenerateRequest,
    GenerateResult,
    ServerLimits,
    TransientBackendError,
    refused,
)

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


def error_message(response: httpx.Response) -> str:
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
        connections_per_pool: int = 32,
    ):
        self.base_url = base_url.rstrip("/")
        self.name = name or f"sglang@{self.base_url}"
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        # A long generation is one request: the read timeout is the whole call, connect fails fast.
        # Several small pools, used in turn: httpcore assigns queued requests to connections in time
        # quadratic in their number (256 concurrent rollouts on one pool: ~10 s of client CPU, 8 pools: ~2 s).
        pool_size = max(1, min(connections_per_pool, max_connections))
        tls = httpx.create_ssl_context()  # one shared context: building one per client costs ~0.1 s each
        self._clients = [
            httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                limits=httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size),
                verify=tls,
            )
            for _ in range(max(1, -(-max_connections // pool_size)))
        ]
        self._turn = itertools.cycle(self._clients)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        start = time.perf_counter()
        response = await self._request("POST", "/generate", json=generate_payload(request))
        result = parse_generate_response(_json(response), self.base_url)
        result.latency_s = time.perf_counter() - start
        return result

    async def health(self) -> bool:
        """True when ``GET /health`` answers 200 (SGLang runs a 1-token generation for it)."""
        try:
            response = await self._clients[0].get("/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def model_info(self) -> dict[str, Any]:
        return _json(await self._request("GET", "/model_info"))

    async def server_limits(self) -> ServerLimits:
        """The served window, seed and cache-report settings, from ``GET /server_info``."""
        return parse_server_info(_json(await self._request("GET", "/server_info")), self.base_url)

    async def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load a LoRA directory (on the server's disk) under ``name`` into the running server."""
        return _json(await self._request("POST", "/load_lora_adapter", json={"lora_name": name, "lora_path": path}))

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        return _json(await self._request("POST", "/unload_lora_adapter", json={"lora_name": name}))

    async def flush_cache(self) -> None:
        """Drop the radix cache (SGLang refuses while requests run: that is a 400 BackendError)."""
        await self._request("POST", "/flush_cache")

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call with retries; 4xx fails at once with the server's message."""
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter: retries of many rollouts spread out
            try:
                response = await next(self._turn).request(method, path, **kwargs)
            except httpx.TimeoutException as exc:
                last = f"timeout ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                last = f"connection error ({type(exc).__name__}: {exc})"
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


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise BackendError(f"{response.request.url}: response is not JSON: {response.text[:200]!r}") from exc
