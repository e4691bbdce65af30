"""Any OpenAI-compatible completions server (vLLM, SGLang's ``/v1``, hosted APIs) via the ``openai`` client.

The Completions API (not Chat) is used so the loop controls the raw context:
``prompt`` is the token-id list when the request has ``input_ids`` (vLLM and
SGLang accept token arrays), else the text. The adapter is selected through the
model name: ``"<model>:<adapter>"`` is SGLang's convention; vLLM serves a LoRA
under its own ``--lora-modules NAME=PATH`` name, given via ``adapter_models``.

Differences from the native SGLang backend, by API design: ``output_ids`` is
``[]`` (the loop tokenizes the text itself), and the server trims a matched stop
string / eos from ``text`` (OpenAI convention). ``top_k``, ``min_p`` and
``skip_special_tokens=false`` go through ``extra_body``; ``standard_only=True``
leaves them out for a server that rejects unknown fields (its own top-k/min-p
then apply), and ``extra_body`` adds server-specific fields.

The API key is read from the environment variable named by ``api_key_env`` and
is scrubbed from every error message (with any Authorization/Bearer material,
:mod:`freelm.redact`); exceptions are raised ``from None`` so the
openai exception (whose request carries the Authorization header) is not chained.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import openai

from freelm.backends.base import (
    BackendError,
    GenerateRequest,
    GenerateResult,
    ServerLimits,
    TransientBackendError,
    refused,
)
from freelm.redact import redact

_NO_KEY = "EMPTY"  # local servers need no key, but the client insists on one


class OpenAIBackend:
    """One OpenAI-compatible endpoint. The client retries first; what is left is mapped to our errors."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        adapter_models: dict[str, str] | None = None,
        timeout: float = 600.0,
        max_retries: int = 3,
        standard_only: bool = False,
        extra_body: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.adapter_models = dict(adapter_models or {})
        self.name = name or f"openai@{self.base_url}"
        self.standard_only = standard_only
        self.extra_body = dict(extra_body or {})
        self._secret = os.environ.get(api_key_env) or ""
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._secret or _NO_KEY, timeout=timeout, max_retries=max_retries
        )

    def model_name(self, adapter: str | None) -> str:
        if adapter is None:
            return self.model
        return self.adapter_models.get(adapter, f"{self.model}:{adapter}")

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        s = request.sampling
        extra = {} if self.standard_only else {"top_k": s.top_k, "min_p": s.min_p, "skip_special_tokens": False}
        extra.update(self.extra_body)
        start = time.perf_counter()
        try:
            response = await self._client.completions.create(
                model=self.model_name(request.adapter),
                prompt=list(request.input_ids) if request.input_ids is not None else request.text,
                max_tokens=request.max_new_tokens,
                temperature=s.temperature,
                top_p=s.top_p,
                stop=list(request.stop) or None,
                seed=request.seed,
                extra_body=extra,
            )
        except openai.APIError as exc:
            raise self._map_error(exc) from None
        latency = time.perf_counter() - start
        return self._parse(response, latency)

    def _parse(self, response: Any, latency: float) -> GenerateResult:
        if not response.choices:
            raise BackendError(f"{self.base_url}: completion response has no choices")
        choice = response.choices[0]
        if choice.finish_reason not in ("stop", "length"):
            raise BackendError(f"{self.base_url}: generation ended with finish_reason={choice.finish_reason!r}")
        usage = response.usage
        details = getattr(usage, "prompt_tokens_details", None) if usage else None
        cached = getattr(details, "cached_tokens", None) if details else None
        return GenerateResult(
            text=choice.text or "",
            output_ids=[],
            finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cached_tokens=cached,
            latency_s=latency,
            endpoint=self.base_url,
        )

    def _map_error(self, exc: openai.APIError) -> BackendError:
        """Connection errors, timeouts, 429 and 5xx are transient; other statuses are final."""
        status = getattr(exc, "status_code", None)
        message = self._scrub(f"{self.base_url}: {type(exc).__name__}" + (f" HTTP {status}" if status else ""))
        message += f": {self._scrub(str(exc.message))}"
        if isinstance(exc, openai.APIConnectionError) or (status is not None and (status == 429 or status >= 500)):
            return TransientBackendError(message)
        server_message = str(exc.message) + (
            " context_length_exceeded" if getattr(exc, "code", None) == "context_length_exceeded" else ""
        )
        return refused(message, server_message, status)

    def _scrub(self, text: str) -> str:
        return redact(text, [self._secret])

    async def server_limits(self) -> ServerLimits:
        """What the server reports: SGLang's ``/server_info`` at the origin, else ``max_model_len`` in ``/v1/models``.

        A server that reports neither gets ``ServerLimits()`` and the runner falls
        back to ``--context-limit`` (with SGLang's margins, the strictest known).
        """
        from freelm.backends.sglang import parse_server_info

        origin = httpx.URL(self.base_url).copy_with(path="/", query=None)
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        try:
            async with httpx.AsyncClient(timeout=10.0) as client:
                response = await client.get(str(origin.join("server_info")), headers=headers)
            if response.status_code == 200:
                limits = parse_server_info(response.json(), self.base_url)
                if limits.window is not None:
                    return limits
        except (httpx.HTTPError, ValueError, BackendError):
            pass  # not SGLang (or not reachable there): ask the OpenAI route
        try:
            models = await self._client.models.list()
        except openai.APIError:
            return ServerLimits()
        for card in models.data:
            length = getattr(card, "max_model_len", None)
            if card.id == self.model and isinstance(length, int) and length > 0:
                return ServerLimits.from_context_length(length, source=f"{self.base_url}/models max_model_len")
        return ServerLimits()

    async def health(self) -> bool:
        try:
            await self._client.models.list()
        except openai.APIError:
            return False
        return True

    async def aclose(self) -> None:
        await self._client.close()
