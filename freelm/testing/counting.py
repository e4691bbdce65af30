"""A deterministic stand-in "model" whose output depends on its context, for fast tests.

The counting model reads the last ``step N`` line of the context it is given and
continues with ``step N+1``, ``step N+2``, ... until ``target``, then closes the
thinking and answers ``\\boxed{target}``. Deleting old steps is harmless, but
deleting the LAST step makes it restart from an earlier number, so cleaning
mistakes show up as longer rollouts, just as they cost a real model. Its
cleaning mode (any adapter) answers the deletion JSON that keeps only the last
step line, or whatever ``clean_responses`` scripts.

No torch, no server: loop, runner and training tests run in milliseconds on it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from freelm.backends.base import GenerateRequest, GenerateResult, ServerLimits
from freelm.prompts import THINK_CLOSE
from freelm.tokenizer import Tokenizer

_STEP = re.compile(r"step (\d+)\n")


def counting_answer(target: int) -> str:
    return f"{THINK_CLOSE}\nThe count is done. \\boxed{{{target}}}"


def counting_tokenizer(target: int, steps: int = 100) -> Tokenizer:
    """A small BPE trained on the model's own text (``step 0`` .. ``step steps-1`` and the answer).

    Trained rather than byte-level so that a step is a few tokens, as words are
    for a real tokenizer, and token budgets in tests stay small.
    """
    from freelm.tinymodel import train_tokenizer

    corpus = [f"step {n}\n" for n in range(steps)] + [counting_answer(target)]
    return Tokenizer(train_tokenizer(corpus, vocab_size=400))


def counting_files(root: Path, target: int, problems: int) -> tuple[Tokenizer, Path, Path]:
    """A runner's inputs for the counting model under ``root``: (tokenizer, its saved directory, problem file).

    The tokenizer is saved so that a runner in a subprocess loads the same ids; problem ``i`` asks to count
    to ``target`` (its prompt names ``i``, so no two prompts are alike).
    """
    tokenizer = counting_tokenizer(target)
    tokenizer.hf.save_pretrained(root / "tokenizer")
    data = root / "problems.jsonl"
    rows = ({"id": i, "prompt": f"Count to {target} ({i}).", "answer": str(target)} for i in range(problems))
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tokenizer, root / "tokenizer", data


@dataclass
class CountingBackend:
    """See the module docstring. ``delay_s`` simulates server latency; ``fail_next`` raises scripted errors."""

    tokenizer: Tokenizer
    target: int = 40
    delay_s: float = 0.0
    clean_responses: deque[str] = field(default_factory=deque)
    fail_next: deque[BaseException] = field(default_factory=deque)
    name: str = "counting"
    calls: int = 0
    clean_calls: int = 0

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_next:
            raise self.fail_next.popleft()
        context = request.text if request.text is not None else self.tokenizer.decode(request.input_ids)
        prompt_tokens = len(request.input_ids) if request.input_ids is not None else len(self.tokenizer.encode(context))
        if request.adapter is not None:
            self.clean_calls += 1
            text = self.clean_responses.popleft() if self.clean_responses else _keep_last_step(context)
            ids = self.tokenizer.encode(text)[: request.max_new_tokens]
            return self._result(ids, len(ids) < request.max_new_tokens, prompt_tokens)
        steps = _STEP.findall(context)
        last = int(steps[-1]) if steps else 0
        continuation = "".join(f"step {n}\n" for n in range(last + 1, self.target + 1))
        continuation += counting_answer(self.target)
        ids = self.tokenizer.encode(continuation)
        if len(ids) <= request.max_new_tokens:
            return self._result(ids, True, prompt_tokens)
        return self._result(ids[: request.max_new_tokens], False, prompt_tokens)

    def _result(self, ids: list[int], stopped: bool, prompt_tokens: int) -> GenerateResult:
        return GenerateResult(
            text=self.tokenizer.decode(ids),
            output_ids=ids,
            finish_reason="stop" if stopped else "length",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(ids),
            cached_tokens=None,
            latency_s=self.delay_s,
            endpoint=self.name,
        )

    async def server_limits(self) -> ServerLimits:
        """No window of its own (it counts as far as asked) and no sampling to seed: it says nothing."""
        return ServerLimits(source=self.name)

    async def aclose(self) -> None:
        return None


def _keep_last_step(context: str) -> str:
    """The oracle cleaning answer: delete from the first step line through the second-to-last one."""
    thinking = context.rsplit("## Reasoning so far\n", 1)[-1]
    lines = _STEP.findall(thinking)
    if len(lines) < 2:
        return "[]"
    return json.dumps([{"prefix": f"step {lines[0]}\n", "suffix": f"step {lines[-2]}\n"}])


class CountingEngine:
    """The counting model as a blocking server engine (:class:`freelm.testing.engines.Engine`).

    ``delay`` seconds per call stand in for GPU time. Any adapter name answers
    the cleaning JSON; the server's registry decides which names exist.
    """

    adapter_names = ["free"]

    def __init__(self, tokenizer: Tokenizer, target: int = 40, delay: float = 0.0):
        self.tokenizer = tokenizer
        self.target = target
        self.delay = delay

    def generate_blocking(self, request: GenerateRequest) -> GenerateResult:
        time.sleep(self.delay)
        return asyncio.run(CountingBackend(self.tokenizer, target=self.target).generate(request))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids)

    def load_adapter(self, name: str, path: str) -> None:
        return None

    def unload_adapter(self, name: str) -> None:
        return None

    def flush_cache(self) -> None:
        return None
