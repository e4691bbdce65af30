"""Does a LoRA-serving engine keep the adapter out of base-model requests batched with adapter requests?

Free()LM relies on one server answering reasoning calls (base model) and
cleaning calls (the Free-Module) at the same time. An engine that lets the
adapter's delta into the base rows of a mixed batch corrupts the reasoner
silently: every status is 200 and only the outputs show it. Known cases:

* vLLM on CPU (vLLM 0.32.0, ``vllm/lora/ops/torch_ops/lora_ops.py``: ``bgmv_shrink`` /
  ``bgmv_expand`` index the stacked adapter weights with the no-adapter sentinel
  -1, i.e. the last slot). With ``--max-loras`` equal to the adapters in use the
  last slot holds an adapter, and base rows batched with adapter rows decode
  with its delta; one slot more keeps it zero (upstream vLLM PR #48421).
* SGLang: a report of cross-adapter contamination through radix-cache reuse
  (sgl-project/sglang issue #24638).

:func:`probe_isolation` asks greedy base-model questions alone, then the same
questions again while adapter requests (on the same prompts) run beside them,
and compares the base answers. A difference is checked once more against a
second base-only round, so a server whose greedy output is not reproducible
at all is reported as such, not as a leak. Greedy, a few prompts and 16 new
tokens: a second or two, and deterministic on a server that is deterministic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from freelm.backends.base import Backend, GenerateRequest, GenerateResult, SamplingParams

Verdict = Literal["isolated", "leak", "inconclusive"]

#: new tokens per probe request: enough for a leaked delta to change a greedy answer, few enough to be cheap
PROBE_TOKENS = 16
#: prompts per probe round (each asked once of the base model and once of the adapter in the mixed round)
PROBE_PROMPTS = 4


@dataclass(frozen=True)
class IsolationReport:
    """What one probe of one endpoint found. ``leaked``: base answers that changed beside adapter requests."""

    endpoint: str
    adapter: str
    prompts: int
    max_new_tokens: int
    leaked: int
    adapter_visible: bool  # the adapter answers some prompt differently from the base model (else: nothing to see)
    reproducible: bool  # base alone answered the same twice (asked again only when a difference showed)
    seconds: float
    first_difference: str | None = None

    @property
    def verdict(self) -> Verdict:
        if self.leaked and self.reproducible:
            return "leak"
        if not self.reproducible or not self.adapter_visible:
            return "inconclusive"
        return "isolated"

    def describe(self) -> str:
        """One line for the operator: the verdict and the evidence."""
        if self.verdict == "leak":
            return (
                f"{self.leaked}/{self.prompts} greedy base-model answers changed when adapter {self.adapter!r} "
                f"requests ran beside them ({self.first_difference})"
            )
        if not self.reproducible:
            return f"the same greedy base-model requests gave different answers twice ({self.first_difference})"
        if not self.adapter_visible:
            return f"adapter {self.adapter!r} answered the probe prompts exactly as the base model: nothing to compare"
        return (
            f"{self.prompts}/{self.prompts} greedy base-model answers unchanged beside adapter {self.adapter!r} "
            f"requests ({self.seconds:.1f} s)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def _answer(result: GenerateResult) -> tuple[Any, ...]:
    """What a greedy answer is compared by: its token ids where the server gives them, else its text."""
    return tuple(result.output_ids) if result.output_ids else (result.text,)


def _first_difference(a: Sequence[GenerateResult], b: Sequence[GenerateResult]) -> str | None:
    for index, (x, y) in enumerate(zip(a, b)):
        if _answer(x) != _answer(y):
            return f"prompt {index}: {x.text[:40]!r} alone vs {y.text[:40]!r}"
    return None


async def probe_isolation(
    backend: Backend,
    adapter: str,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = PROBE_TOKENS,
    endpoint: str | None = None,
) -> IsolationReport:
    """Base answers alone vs beside adapter requests on ``backend`` (one endpoint); raises what ``generate`` raises.

    All requests of a round are sent at once, the adapter's first, so the
    engine schedules them into the same batches.
    """
    started = time.perf_counter()
    greedy = SamplingParams.greedy()

    def request(ids: Sequence[int], name: str | None) -> GenerateRequest:
        return GenerateRequest(max_new_tokens, input_ids=list(ids), sampling=greedy, adapter=name)

    async def base_alone() -> list[GenerateResult]:
        return list(await asyncio.gather(*(backend.generate(request(p, None)) for p in prompts)))

    alone = await base_alone()
    mixed = await asyncio.gather(
        *(backend.generate(request(p, adapter)) for p in prompts),
        *(backend.generate(request(p, None)) for p in prompts),
    )
    adapter_answers, beside = mixed[: len(prompts)], mixed[len(prompts) :]
    leaked = sum(_answer(a) != _answer(b) for a, b in zip(alone, beside))
    difference = _first_difference(alone, beside)
    reproducible = True
    if leaked:
        again = await base_alone()
        reproducible = all(_answer(a) == _answer(b) for a, b in zip(alone, again))
        difference = difference if reproducible else _first_difference(alone, again)
    return IsolationReport(
        endpoint=endpoint or getattr(backend, "name", "?"),
        adapter=adapter,
        prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        leaked=leaked,
        adapter_visible=any(_answer(a) != _answer(b) for a, b in zip(alone, adapter_answers)),
        reproducible=reproducible,
        seconds=time.perf_counter() - started,
        first_difference=difference,
    )
