"""The one small interface every backend implements, and the structs it speaks.

A backend turns a :class:`GenerateRequest` (token ids or text, sampling, an
optional adapter name) into a :class:`GenerateResult`. The loop never knows which
server or library is behind it, so the reasoner and the cleaner can be different
backends (the paper's cross-model setup) and a pool of endpoints is itself a
backend (see ``freelm.backends.pool``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings sent with every request.

    Defaults are Qwen3's thinking-mode recommendation; always sent explicitly,
    because SGLang otherwise falls back to the model's generation_config.
    ``top_k=-1`` and ``min_p=0`` mean "off".
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    min_p: float = 0.0

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateRequest:
    """One generation call. Exactly one of ``input_ids`` and ``text`` is set.

    ``adapter`` is the LoRA adapter NAME as registered with the server (SGLang's
    ``--lora-paths NAME=PATH``); ``None`` is the base model.
    """

    max_new_tokens: int
    input_ids: list[int] | None = None
    text: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

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


class BackendError(RuntimeError):
    """A request failed for good (bad request, unknown adapter, ...): do not retry."""


class TransientBackendError(BackendError):
    """Connection error, timeout or 5xx: worth retrying, possibly on another endpoint."""


@runtime_checkable
class Backend(Protocol):
    """Anything that can generate. Implementations: sglang, openai, local, pool."""

    name: str

    async def generate(self, request: GenerateRequest) -> GenerateResult: ...

    async def aclose(self) -> None: ...
