"""Any OpenAI-compatible completions server (vLLM, SGLang's ``/v1``, llama.cpp's ``llama-server``) via ``openai``.

The Completions API (not Chat) is used so the loop controls the raw context:
``prompt`` is the token-id list when the request has ``input_ids`` (vLLM, SGLang
and llama-server accept token arrays), else the text. A server whose schema takes
text only (llama-cpp-python's server answers HTTP 500 to a token array) gets the
decoded text instead: ``text_prompts=True``, or detected once by
:meth:`OpenAIBackend.startup_check` (a token prompt fails where the same text
succeeds), never per rollout. The adapter is selected through the model name:
``"<model>:<adapter>"`` is SGLang's convention; vLLM serves a LoRA under its bare
``--lora-modules NAME=PATH`` name (``adapter_models`` maps a run's adapter to any
served name; :mod:`freelm.backends.vllm` is the backend that speaks vLLM's own rules).

The class is the transport (the ``openai`` client, its retries and the error
mapping, as lm-eval's ``api_models.py`` keeps them in its base class) with hooks
a server-specific subclass overrides: :meth:`OpenAIBackend.model_name` (how an
adapter is addressed), :meth:`OpenAIBackend._extra` (the extension fields sent),
:meth:`OpenAIBackend._output_ids` (where a response's generated ids are), and
:meth:`OpenAIBackend.server_limits` / :meth:`OpenAIBackend.startup_check`.

Servers accept any model name and silently serve the base model (llama-server
and llama-cpp-python both do), so a Free()LM run against a server without the
adapter would be a vanilla run: :meth:`startup_check` requires every model name
the run will use in ``/v1/models`` (or, for SGLang's ``SERVED:ADAPTER``, which its
listing shows as the bare adapter name, a one-token request under that exact
name that the server answers as itself: vLLM lists its adapters the same way but
answers ``SERVED:ADAPTER`` with 404), and every adapter response's ``model``
field must name what was asked for (llama-server answers with its own model name).

Differences from the native SGLang backend, by API design: ``output_ids`` is
``[]`` (the loop tokenizes the text itself, dropping a character split at the
chunk end) except against llama-server, whose logprobs carry the generated ids
when they hold one per token (:func:`_logprob_ids`), ``completion_tokens`` counts a trimmed eos as the server does, and
the server trims a matched stop string / eos from ``text`` (OpenAI convention).
``top_k`` (only when sampling: under greedy it means nothing and some servers
reject ``-1``), ``min_p``, ``skip_special_tokens=false`` and a repetition penalty
of 1.0 under both its names (``repetition_penalty`` for vLLM/SGLang,
``repeat_penalty`` for llama.cpp, whose servers default to 1.1) go through
``extra_body``; ``standard_only=True`` leaves them out for a server that rejects
unknown fields (its own defaults then apply; the startup check records what
llama-server's ``/props`` says they are), and ``extra_body`` adds server-specific
fields. :attr:`OpenAIBackend.served` holds what the startup check found, for the
run manifest.

The API key is read from the environment variable named by ``api_key_env`` and
is scrubbed from every error message (with any Authorization/Bearer material,
:mod:`freelm.redact`); exceptions are raised ``from None`` so the
openai exception (whose request carries the Authorization header) is not chained.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from freelm.backends import BackendArgs, BackendFlag, BackendKind, register_backend
from freelm.backends.base import (
    BackendError,
    ContextWindow,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    ServerLimits,
    TransientBackendError,
    check_length,
    refused,
)
from freelm.http_limits import bounded_httpx_client, probe_timeout, reply_cap, reply_limit, with_transport_reason
from freelm.redact import redact

if TYPE_CHECKING:
    import openai  # openai and httpx are imported where used: discovering the kinds stays cheap

_NO_KEY = "EMPTY"  # local servers need no key, but the client insists on one
_ERROR_CHARS = 300  # a server's error body can be 60 KB (a whole validation dump): one log line stays readable
#: A 500 whose message says the request itself is wrong fails the same way on every retry (llama-cpp-python
#: answers schema errors with 500); everything else 5xx is the server's trouble and worth retrying.
_VALIDATION_MARKERS = ("validation error", "input should be", "field required", "extra inputs are not permitted")
_NEUTRAL_PENALTY = {"repetition_penalty": 1.0, "repeat_penalty": 1.0}
_PROBE_SAMPLING = SamplingParams.greedy()
_NAME_PROBE = "Hello"  # the prompt of the one-token request that proves a served name


class OpenAIBackend:
    """One OpenAI-compatible endpoint. The client retries first; what is left is mapped to our errors."""

    #: the repetition penalty of 1.0 under every name a server may default otherwise (sent unless standard_only)
    neutral_penalty: ClassVar[dict[str, float]] = _NEUTRAL_PENALTY

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
        text_prompts: bool = False,
        decode: Callable[[list[int]], str] | None = None,
        name: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.adapter_models = dict(adapter_models or {})
        self.name = name or f"openai@{self.base_url}"
        self.standard_only = standard_only
        self.extra_body = dict(extra_body or {})
        self.text_prompts = text_prompts
        self._decode = decode  # token ids -> prompt text, for a text-only server
        self.ids_via_logprobs = False  # llama-server: its generated token ids ride along with logprobs
        self.served: dict[str, Any] = {}
        self.health_error: str | None = None  # why the last health probe failed, for the operator
        self._secret = os.environ.get(api_key_env) or ""
        import openai

        # the client's own timeout is per read: the bounded client makes it the whole reply's, and caps its size
        self._client = openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._secret or _NO_KEY, timeout=timeout, max_retries=max_retries,
            http_client=bounded_httpx_client(timeout),
        )  # fmt: skip
        # health and start-up questions: a total of seconds, not --timeout, and never retried (the pool re-probes)
        self._probes = self._client.with_options(timeout=probe_timeout(timeout), max_retries=0)

    def model_name(self, adapter: str | None) -> str:
        if adapter is None:
            return self.model
        return self.adapter_models.get(adapter, f"{self.model}:{adapter}")

    def _prompt(self, request: GenerateRequest) -> list[int] | str:
        if request.input_ids is None:
            return request.text or ""
        if not self.text_prompts:
            return list(request.input_ids)
        if self._decode is None:
            raise BackendError(f"{self.base_url}: text prompts need a tokenizer to decode the token ids")
        return self._decode(list(request.input_ids))

    def _extra(self, request: GenerateRequest) -> dict[str, Any]:
        s = request.sampling
        extra: dict[str, Any] = {}
        if not self.standard_only:
            extra = {"min_p": s.min_p, "skip_special_tokens": False, **self.neutral_penalty}
            if s.temperature > 0:  # greedy needs no top_k, and some servers reject -1
                extra["top_k"] = s.top_k
        if self.ids_via_logprobs:
            extra["logprobs"] = 1
        extra.update(self.extra_body)
        return extra

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await self._generate(request, self._client)

    async def _generate(self, request: GenerateRequest, client: openai.AsyncOpenAI) -> GenerateResult:
        """One completion through ``client`` (the backend's, or its probe client: the start-up check's)."""
        import openai

        s = request.sampling
        model = self.model_name(request.adapter)
        start = time.perf_counter()
        try:
            with reply_cap(reply_limit(request.max_new_tokens)):
                response = await client.completions.create(
                    model=model,
                    prompt=self._prompt(request),
                    max_tokens=request.max_new_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    stop=list(request.stop) or None,
                    seed=request.seed,
                    extra_body=self._extra(request),
                )
        except openai.APIError as exc:
            raise self._map_error(exc) from None
        latency = time.perf_counter() - start
        served = getattr(response, "model", None)  # base requests unchecked: hosted APIs answer with a dated name
        if request.adapter is not None and served and served != model:
            raise BackendError(
                f"{self.base_url}: asked for model {model!r} but the response came from {served!r}: "
                "the server ignores the model name (an adapter it does not serve runs as the base model)"
            )
        return check_length(request, self._parse(response, latency))

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
            output_ids=self._output_ids(choice, usage.completion_tokens if usage else 0),
            finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            cached_tokens=cached,
            latency_s=latency,
            endpoint=self.base_url,
        )

    def _output_ids(self, choice: Any, generated: int) -> list[int]:
        """The generated token ids of a choice; ``[]`` (the loop encodes the text) where the server gives none."""
        return _logprob_ids(choice, generated)

    def _map_error(self, exc: openai.APIError) -> BackendError:
        """Connection errors, timeouts, 429 and 5xx are transient, except a 500 that says the request is invalid."""
        import openai

        status = getattr(exc, "status_code", None)
        message = self._scrub(f"{self.base_url}: {type(exc).__name__}" + (f" HTTP {status}" if status else ""))
        detail = self._scrub(with_transport_reason(exc) if isinstance(exc, openai.APIConnectionError) else exc.message)
        message += f": {detail[:_ERROR_CHARS]}" + (f"... ({len(detail)} chars)" if len(detail) > _ERROR_CHARS else "")
        invalid = any(marker in detail.lower() for marker in _VALIDATION_MARKERS)
        if isinstance(exc, openai.APIConnectionError) or (
            status is not None and (status == 429 or (status >= 500 and not invalid))
        ):
            return TransientBackendError(message)
        server_message = str(exc.message) + (
            " context_length_exceeded" if getattr(exc, "code", None) == "context_length_exceeded" else ""
        )
        return refused(message, server_message, status)

    def _scrub(self, text: str) -> str:
        return redact(text, [self._secret])

    async def server_limits(self) -> ServerLimits:
        """What the server reports: SGLang's ``/server_info`` at the origin, else ``/v1/models``.

        In ``/v1/models``: vLLM's ``max_model_len``, or llama-server's ``meta.n_ctx``,
        the window of one slot (``-c`` split over ``--parallel``), which is what one
        request gets.

        A server that reports neither gets ``ServerLimits()`` and the runner falls
        back to ``--context-limit`` (with SGLang's margins, the strictest known).
        """
        import httpx
        import openai

        from freelm.backends.sglang import parse_server_info

        origin = httpx.URL(self.base_url).copy_with(path="/", query=None)
        try:
            response = await self._probes.get(str(origin.join("server_info")), cast_to=httpx.Response)
            if response.status_code == 200:
                limits = parse_server_info(response.json(), self.base_url)
                if limits.window is not None:
                    return limits
        except (openai.APIError, ValueError, BackendError):
            pass  # not SGLang (or not reachable there): ask the OpenAI route
        try:
            models = await self._probes.models.list()
        except openai.APIError:
            return ServerLimits()
        for card in models.data:
            if card.id != self.model:
                continue
            length = getattr(card, "max_model_len", None)
            if isinstance(length, int) and length > 0:
                return ServerLimits.from_context_length(length, source=f"{self.base_url}/models max_model_len")
            meta = (card.model_extra or {}).get("meta")
            n_ctx = meta.get("n_ctx") if isinstance(meta, dict) else None
            if isinstance(n_ctx, int) and n_ctx > 2:
                source = f"{self.base_url}/models meta.n_ctx (llama-server's per-slot window)"
                return ServerLimits(window=ContextWindow.llama_server(n_ctx, source=source), source=source)
        return ServerLimits()

    async def health(self) -> bool:
        import openai

        try:
            await self._probes.models.list()
        except openai.APIError as exc:
            self.health_error = self._map_error(exc).args[0]  # e.g. llama-server's 503 "Loading model"
            return False
        self.health_error = None
        return True

    async def startup_check(self, adapters: Sequence[str | None], probe_ids: Sequence[int] = ()) -> dict[str, Any]:
        """Before the first rollout: every model name the run uses is served; learn the prompt kind.

        Raises :class:`BackendError` naming the adapter and the endpoint when a name is not in ``/v1/models``.
        ``probe_ids`` (a few token ids) detect a text-only server: one token is asked for with them as the
        prompt and, if that fails with an HTTP error, with their text; only the text succeeding switches
        this backend to text prompts. Returns (and keeps in :attr:`served`) what was found.
        """
        import openai

        try:
            cards = (await self._probes.models.list()).data
        except openai.APIError as exc:
            raise self._map_error(exc) from None
        served = [card.id for card in cards]
        # SGLang lists a loaded LoRA under its own name, parent = the base, and serves it as "base:name"
        # (entrypoints/http_server.py: available_models); vLLM lists its LoRAs the same way but serves them
        # only under the bare name (entrypoints/openai/models/serving.py: show_available_models, check_model
        # answers anything else 404). So a parent card proves nothing alone: the exact name must answer.
        loras = {card.id: card for card in cards if getattr(card, "parent", None) == self.model}
        for adapter in dict.fromkeys(adapters):
            name = self.model_name(adapter)
            if name in served:
                continue
            refusal = ""
            if adapter is not None and adapter not in self.adapter_models and adapter in loras:
                refusal = await self._refusal_of(adapter)
                if not refusal:
                    continue
            what = f"the cleaner's adapter {adapter!r} (model name {name!r})" if adapter else f"model {name!r}"
            hint = ""
            if adapter in loras and getattr(loras[adapter], "owned_by", None) == "vllm":
                hint = f" This is vLLM, which serves the adapter as model {adapter!r}: use --backend vllm."
            raise BackendError(  # the listing is the server's text: redacted like its errors
                f"{self.base_url}: {what} is not served here; /v1/models lists {self._scrub(str(served))}"
                f"{refusal}.{hint} Serve the adapter (SGLang --lora-paths NAME=PATH, vLLM --lora-modules "
                "NAME=PATH with --backend vllm) or point --cleaner-endpoint at a server that has it"
            )
        # llama-server's logprobs name each generated token's id: the ids it generated, which re-encoding
        # the text does not give back ("\n\n" generated as one token encodes as two)
        self.ids_via_logprobs = any(c.id == self.model and getattr(c, "owned_by", None) == "llamacpp" for c in cards)
        if probe_ids and not self.text_prompts:
            self.text_prompts = await self._takes_text_only(list(probe_ids))
        self.served = {
            "models": served,
            "text_prompts": self.text_prompts,
            "token_ids_from_logprobs": self.ids_via_logprobs,
            "sent": {} if self.standard_only else {**self.neutral_penalty, **self.extra_body},
            "server_defaults": await self._server_defaults(),
        }
        return self.served

    async def _refusal_of(self, adapter: str) -> str:
        """Why a one-token request for ``adapter`` under its model name fails (``""``: the server answers as it)."""
        try:
            request = GenerateRequest(1, text=_NAME_PROBE, sampling=_PROBE_SAMPLING, adapter=adapter)
            await self._generate(request, self._probes)
        except TransientBackendError:
            raise  # a server in trouble says nothing about the name
        except BackendError as exc:
            return f" (a request for it failed: {str(exc).removeprefix(self.base_url + ': ')})"
        return ""

    async def _takes_text_only(self, probe_ids: list[int]) -> bool:
        """Whether only a text prompt works here; a probe of one token each, under the probe deadline."""
        ids_request = GenerateRequest(1, input_ids=probe_ids, sampling=_PROBE_SAMPLING)
        try:
            await self._generate(ids_request, self._probes)
            return False
        except TransientBackendError as exc:
            if "HTTP" not in str(exc):  # connection trouble says nothing about the schema
                raise
        except BackendError:
            pass
        if self._decode is None:
            return False
        self.text_prompts = True
        try:
            await self._generate(ids_request, self._probes)
        except BackendError:
            self.text_prompts = False
            raise
        return True

    async def _server_defaults(self) -> dict[str, Any] | None:
        """llama-server's default sampling (``/props``), where the server has it: what applies to unsent fields."""
        import httpx
        import openai

        root = self.base_url.removesuffix("/v1")
        try:
            response = await self._probes.get(f"{root}/props", cast_to=httpx.Response)
            settings = response.json().get("default_generation_settings", {}).get("params")
        except (openai.APIError, ValueError, AttributeError):
            return None
        keys = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n")
        return {k: settings[k] for k in keys if k in settings} if isinstance(settings, dict) else None

    async def aclose(self) -> None:
        await self._client.close()


def _logprob_ids(choice: Any, generated: int) -> list[int]:
    """Token ids from llama-server's logprobs (``logprobs.content[].id``); ``[]`` unless there is one per token.

    llama-server leaves out of its logprobs every token generated while its text ends inside a UTF-8
    character (``tools/server/server-context.cpp``: ``process_token`` adds a token only when the text is
    not incomplete), and those trimmed with a stop string: a list shorter than ``completion_tokens`` would
    drop tokens from the context, so the loop falls back to encoding the text.
    """
    content = (getattr(choice.logprobs, "model_extra", None) or {}).get("content") if choice.logprobs else None
    if not isinstance(content, list) or len(content) != generated or not content:
        return []
    ids = [item.get("id") if isinstance(item, dict) else None for item in content]
    return ids if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) else []  # type: ignore[return-value]


def _api_root(url: str) -> str:
    """``http://host:port`` -> ``.../v1``; a URL with a path is taken as the API root already."""
    return url if url.split("://", 1)[1].partition("/")[2] else f"{url}/v1"


def _runner_options(args: BackendArgs) -> dict[str, Any]:
    return {
        "base_url": _api_root(args.url or ""), "model": args.flags["served_model"],
        "api_key_env": args.flags["api_key_env"], "timeout": args.timeout, "max_retries": args.max_retries,
        "text_prompts": args.flags["text_prompts"],
        "decode": args.tokenizer.decode if args.tokenizer is not None else None,
    }  # fmt: skip


#: the flags the OpenAI-route kinds share (``--backend openai`` and ``vllm``): one declaration, added once
SERVED_MODEL = BackendFlag(
    "--served-model",
    "--backend openai: the served model name (adapters as NAME:ADAPTER); vllm: optional, /v1/models names it",
    {"metavar": "NAME", "default": None},
)
API_KEY_ENV = BackendFlag(
    "--api-key-env",
    "--backend openai/vllm: environment variable holding the API key",
    {"metavar": "VAR", "default": "OPENAI_API_KEY"},
)

register_backend(
    BackendKind(
        "openai", OpenAIBackend, remote=True, options=_runner_options, needs=("--served-model",),
        help="any OpenAI-compatible /v1/completions", order=1,
        flags=(
            SERVED_MODEL,
            BackendFlag(
                "--text-prompts",
                "--backend openai: send prompts as text (for servers that take no token ids; detected at startup too)",
                {"action": "store_true"},
            ),
            API_KEY_ENV,
        ),
    )
)  # fmt: skip
