"""The one small interface every backend implements, and the structs it speaks.

A backend turns a :class:`GenerateRequest` (token ids or text, sampling, an
optional adapter name) into a :class:`GenerateResult`. The loop never knows which
server or library is behind it, so the reasoner and the cleaner can be different
backends (the paper's cross-model setup) and a pool of endpoints is itself a
backend (see ``freelm.backends.pool``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from freelm.setting import setting

if TYPE_CHECKING:
    from freelm.tokenizer import Tokenizer

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings sent with every request.

    Defaults are Qwen3's thinking-mode recommendation; always sent explicitly,
    because SGLang otherwise falls back to the model's generation_config.
    ``top_k=-1`` and ``min_p=0`` mean "off". Each field is a setting
    (:mod:`freelm.setting`): its runner flag, bounds and hash key are declared here.
    """

    # the ranges SGLang's sampling/sampling_params.py verify() accepts: outside them every request is refused
    # (HTTP 400, or the local sampler's error), so a run would end with every rollout failed (checked first)
    temperature: float = setting(0.6, flag="--temperature", metavar="T", minimum=0, help="0 = greedy")
    top_p: float = setting(0.95, flag="--top-p", metavar="P", minimum=0, above=True, maximum=1, help="nucleus mass")
    top_k: int = setting(20, flag="--top-k", metavar="K", help="-1 = off")
    min_p: float = setting(0.0, flag="--min-p", metavar="P", minimum=0, maximum=1, help="0 = off")

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


#: How a rollout resumes after a cleaning deleted tokens (docs/free.md, "Resuming after a deletion"): the engine
#: prefills again everything after the first deleted token (``reprefill``, what every server does), or evicts the
#: deleted tokens' KV in place, the survivors keeping their positions (``evict-gaps``, Memento's scheme) or their
#: keys re-rotated to contiguous ones (``evict-rerotate``, kvpress' ``KeyRerotationPress``).
RESUME_STRATEGIES = ("reprefill", "evict-gaps", "evict-rerotate")


@dataclass(frozen=True)
class Eviction:
    """What a cleaning deleted from this rollout's previous request, for an engine that evicts it from the KV in place.

    ``removed``: sorted, disjoint ``[start, end)`` token ranges of the previous
    request's context (its input ids followed by its output ids). The new
    input is that context without them (:func:`freelm.loop` keeps the other
    ids verbatim), possibly followed by a re-encoded tail. An engine checks this
    against the ids it holds and reuses nothing it cannot match, so a wrong
    hint costs a prefill, never a wrong token.
    """

    strategy: str  # "evict-gaps" or "evict-rerotate"
    removed: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if self.strategy not in RESUME_STRATEGIES[1:]:
            raise ValueError(f"Eviction.strategy must be one of {RESUME_STRATEGIES[1:]}, got {self.strategy!r}")
        last = 0
        for start, end in self.removed:
            if not last <= start < end:
                raise ValueError(f"Eviction.removed must be sorted disjoint [start, end) ranges, got {self.removed}")
            last = end


@dataclass
class GenerateRequest:
    """One generation call. Exactly one of ``input_ids`` and ``text`` is set.

    ``adapter`` is the LoRA adapter NAME as registered with the server (SGLang's
    ``--lora-paths NAME=PATH``); ``None`` is the base model. ``eviction`` (a
    reasoning call after a cleaning, with an eviction strategy) is read by the
    in-process engine only; a server re-prefills, and the runner refuses the
    strategy for one.
    """

    max_new_tokens: int
    input_ids: list[int] | None = None
    text: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    eviction: Eviction | None = None

    def __post_init__(self) -> None:
        if (self.input_ids is None) == (self.text is None):
            raise ValueError("GenerateRequest needs exactly one of input_ids and text")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerateResult:
    """What came back. ``cached_tokens`` is None when the server does not report it."""

    text: str
    output_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None
    latency_s: float = 0.0
    endpoint: str | None = None
    evicted_tokens: int = 0  # KV entries of the previous context removed in place (an Eviction honoured)
    rerotated_tokens: int = 0  # kept entries whose keys were re-rotated to a new position


class BackendError(RuntimeError):
    """A request failed for good (bad request, unknown adapter, ...): do not retry."""


class ContextLengthError(BackendError):
    """The server refused the request because its prompt or prompt + max_new_tokens exceeds its window.

    A reasoning call refused this way ends the rollout as ``context_overflow``
    (its text kept and graded), exactly like a rollout that filled the window.
    """


#: How servers word a window refusal: SGLang ``tokenizer_manager.py`` ("is longer than the model's
#: context length", "exceeds the model's maximum context length"), SGLang ``managers/utils.py``
#: ``validate_input_length`` ("exceeds the maximum allowed length"), OpenAI ("maximum context length",
#: ``context_length_exceeded``), llama-server ``tools/server/server-context.cpp`` ("exceeds the available
#: context size"), and vLLM's, read in 0.32.0 (:meth:`ContextWindow.vllm`): a prompt of exactly
#: ``max_model_len`` tokens leaves ``max_tokens`` 0 (``entrypoints/serve/utils/api_utils.py: get_max_tokens``),
#: which ``sampling_params.py`` refuses ("max_tokens must be at least 1, got 0"); a longer one is refused by
#: ``renderers/params.py`` ("This model's maximum context length is N tokens. However, your prompt contains M
#: input tokens ...") or ``v1/engine/input_processor.py`` ("... is longer than the maximum model length of
#: N"); ``max_tokens`` above the window is refused by ``renderers/params.py`` ("max_tokens=X cannot be
#: greater than max_model_len=N"). Older vLLM refused prompt + max_tokens over the window instead of
#: clamping, in wordings that begin "This model's maximum context length is" too.
_CONTEXT_ERROR_MARKERS = (
    "context length",
    "maximum context length",
    "maximum allowed length",
    "context_length_exceeded",
    "available context size",
    "max_tokens must be at least 1, got 0",
    "maximum model length",
    "cannot be greater than max_model_len",
)


def says_window_exceeded(server_message: str) -> bool:
    """Whether an error text is a window refusal in one of the servers' wordings above."""
    text = server_message.lower()
    return any(marker in text for marker in _CONTEXT_ERROR_MARKERS)


def refused(message: str, server_message: str, status: int | None = 400) -> BackendError:
    """The error for a request the server refused: a :class:`ContextLengthError` when a 400 (or an abort,
    ``status=None``) says it does not fit the window, else a plain :class:`BackendError`."""
    fits = not says_window_exceeded(server_message)
    return BackendError(message) if fits or status not in (400, None) else ContextLengthError(message)


@dataclass(frozen=True)
class ContextWindow:
    """The lengths a server serves: the largest prompt it takes and the largest prompt + ``max_new_tokens``.

    SGLang 0.5.23 checks a request twice (``managers/tokenizer_manager.py``:
    400 when ``input >= context_len`` or ``input + max_new_tokens > context_len``;
    ``managers/scheduler.py`` with ``managers/tp_worker.py``: 400 when ``input >=
    max_req_input_len``, and ``max_new_tokens`` silently capped to ``max_req_len -
    input - 1``, where ``max_req_len = min(context_len - 1, kv_capacity - 1)`` and
    ``max_req_input_len = max_req_len - 5``). :meth:`room` asks for exactly what
    is served in full, so a call that fills the window ends as ``length`` where
    it was asked to, and the next call is never one the server refuses.
    """

    max_input: int
    max_total: int
    source: str = "--context-limit"

    @classmethod
    def sglang(
        cls, context_length: int, max_req_input_len: int | None = None, reserved: int = 0, source: str = ""
    ) -> ContextWindow:
        """SGLang's window for ``context_len`` (and the scheduler's ``max_req_input_len`` when known).

        ``reserved``: output slots EAGLE speculative decoding adds to every input
        (``managers/utils.py: compute_num_reserved_tokens``). Without a reported
        ``max_req_input_len`` the KV pool is assumed to hold a full window.
        """
        max_req_len = context_length - 1
        if max_req_input_len is not None:  # max_req_input_len = max_req_len - 5 (less a dLLM block, if any)
            max_req_len = min(max_req_len, max_req_input_len + 5)
        else:
            max_req_input_len = max_req_len - 5
        return cls(
            max_input=min(max_req_input_len - 1, context_length - 1 - reserved),
            max_total=min(max_req_len - 1, context_length - reserved),
            source=source or f"SGLang rules on a {context_length}-token window",
        )

    @classmethod
    def llama_server(cls, n_ctx: int, source: str = "") -> ContextWindow:
        """llama-server's window for a slot of ``n_ctx`` tokens (``tools/server/server-context.cpp``).

        A prompt of ``n_ctx`` tokens or more is refused ("exceeds the available
        context size"); generation stops once prompt + output + 1 reaches ``n_ctx``
        (context shift off). So prompt + output stays below ``n_ctx``, with room
        for at least one new token.
        """
        return cls(max_input=n_ctx - 2, max_total=n_ctx - 1, source=source or f"llama-server n_ctx {n_ctx}")

    @classmethod
    def vllm(cls, max_model_len: int, source: str = "") -> ContextWindow:
        """vLLM's window for ``max_model_len`` (read in vLLM 0.32.0).

        ``entrypoints/serve/utils/api_utils.py: get_max_tokens`` clamps
        ``max_tokens`` to ``max_model_len - prompt`` silently (the call ends
        ``length`` early, status 200), so a prompt of ``max_model_len - 1``
        tokens still gets one new token and prompt + output may reach
        ``max_model_len`` exactly; a prompt of ``max_model_len`` tokens is
        refused (``max_tokens`` clamped to 0, ``sampling_params.py``), a longer
        one too (``renderers/params.py``). :meth:`room` never asks for more
        than is served, so the silent clamp never shortens a call.
        """
        return cls(
            max_input=max_model_len - 1, max_total=max_model_len, source=source or f"vLLM max_model_len {max_model_len}"
        )

    @classmethod
    def budget(cls, context_limit: int) -> ContextWindow:
        """The rollout's own budget (``--context-limit``): prompt + response stay below ``context_limit``."""
        return cls(max_input=context_limit - 2, max_total=context_limit - 1, source="--context-limit")

    def room(self, input_tokens: int) -> int:
        """The most ``max_new_tokens`` a request with this prompt gets in full; 0 when it would be refused."""
        if input_tokens > self.max_input:
            return 0
        return max(0, self.max_total - input_tokens)

    def narrow(self, other: ContextWindow | None) -> ContextWindow:
        """Both windows at once (e.g. the served one and the flag's budget)."""
        if other is None:
            return self
        if other.max_input >= self.max_input and other.max_total >= self.max_total:
            return self
        if other.max_input <= self.max_input and other.max_total <= self.max_total:
            return other
        return ContextWindow(
            min(self.max_input, other.max_input),
            min(self.max_total, other.max_total),
            f"{self.source} + {other.source}",
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ServerLimits:
    """What a server says about itself that changes what the loop may send and what its seeds mean.

    ``None`` = the server did not say. ``seeds_honoured``: SGLang applies
    ``sampling_seed`` only under ``--enable-deterministic-inference``
    (``sampling/sampling_batch_info.py``), where ``min_p > 0`` asserts
    (``layers/sampler.py``: ``min_p_forbidden``). ``cache_report``: the OpenAI route reports
    ``cached_tokens`` only with ``--enable-cache-report``.
    """

    window: ContextWindow | None = None
    seeds_honoured: bool | None = None
    cache_report: bool | None = None
    min_p_forbidden: bool = False
    source: str = ""

    @classmethod
    def from_context_length(cls, context_length: int, source: str) -> ServerLimits:
        """A server that reports only its context length (``max_model_len``): SGLang's margins, the strictest known."""
        return cls(window=ContextWindow.sglang(context_length, source=source), source=source)

    def to_dict(self) -> dict:
        return asdict(self)


class TransientBackendError(BackendError):
    """Connection error, timeout or 5xx: worth retrying, possibly on another endpoint."""


def check_length(request: GenerateRequest, result: GenerateResult) -> GenerateResult:
    """``result``, unless it holds more tokens than ``request`` asked for: then a :class:`TransientBackendError`.

    No engine generates past ``max_new_tokens`` (SGLang caps it further, never
    raises it: ``managers/scheduler.py: init_req_max_new_tokens``), so a reply
    with more output ids or a larger ``completion_tokens`` comes from a broken
    or hostile server. It is refused rather than cut to size: what it sent is
    not what the engine would have generated, and the request is retried (on
    another endpoint, by the pool), so no record ever claims more tokens than
    were asked for, nor a context past the window.
    """
    asked = request.max_new_tokens
    sent = max(len(result.output_ids), result.completion_tokens)
    if sent > asked:
        raise TransientBackendError(
            f"{result.endpoint or 'server'}: reply holds {sent:,} tokens for a request of at most {asked:,}: refused"
        )
    return result


@runtime_checkable
class Backend(Protocol):
    """Anything that can generate: what the loop and the cleaners call. Implementations: sglang, openai, local, pool."""

    name: str

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def aclose(self) -> None: ...


class RemoteBackend(Backend, Protocol):
    """A client of a server (a registered kind with ``remote=True``): what the runner asks of every endpoint.

    The endpoint pool probes :meth:`health` to take a dead server out of
    rotation and to re-admit it, and presumes a request hung once it outlives
    the recent ones (an in-process engine is never presumed hung); the runner
    reads :meth:`server_limits` and runs :meth:`startup_check` before the first
    rollout. A kind that lacks one of them is refused by the registry, by name
    (docs/backends.md, "Writing a backend"). Its replies are untrusted: read
    under :mod:`freelm.http_limits`'s byte cap and total deadline,
    probes under its probe deadline, and results through :func:`check_length`.
    """

    #: why the last :meth:`health` probe failed, for the operator (None: it passed, or says no more)
    health_error: str | None

    async def health(self) -> bool:
        """True when the server can generate now; never raises for a server that is down."""
        ...

    async def server_limits(self) -> ServerLimits:
        """What the server says about its window, seeds and cache report; ``ServerLimits()`` when it says nothing."""
        ...

    async def startup_check(self, adapters: Sequence[str | None], probe_ids: Sequence[int] = ()) -> dict[str, Any]:
        """Before the first rollout: each model name the run calls (``None`` = the base model) is served here.

        ``probe_ids`` (a few token ids, given when the base model is among
        ``adapters``) let a client learn how the server takes prompts. Raises
        :class:`BackendError` naming the endpoint and what is missing; returns
        what it found, for the manifest.
        """
        ...


class InProcessBackend(Backend, Protocol):
    """An engine in this process (a registered kind with ``remote=False``), built once from ``--model``.

    It brings the run's tokenizer (the loop encodes with the model's own) and
    reports its window like a server does; it has no health to probe and is
    never presumed hung (a long batch is not a dead server).
    """

    tokenizer: Tokenizer

    async def server_limits(self) -> ServerLimits:
        """The model's window and seed handling (``ServerLimits()`` when it has none to report)."""
        ...


def missing_members(obj: Any, protocol: type) -> list[str]:
    """The methods (and, for an instance, the attributes) of ``protocol`` beyond :class:`Backend` that ``obj`` lacks.

    ``obj`` is a class (its methods are checked, at registration) or a built
    backend (its attributes too): the registry names what a kind forgot
    instead of the pool or the runner finding out mid-run.
    """
    missing = []
    for name, value in vars(protocol).items():
        if callable(value) and not name.startswith("_") and not callable(getattr(obj, name, None)):
            missing.append(f"{name}()")
    if not isinstance(obj, type):
        missing += [name for name in vars(protocol).get("__annotations__", {}) if not hasattr(obj, name)]
    return missing
