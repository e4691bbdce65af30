"""Teachers for reward-filtered synthesis: who suggests the deletions the reward filter then checks.

A teacher reads a cut's problem and thinking and answers in the Free-Module's
JSON format, which the project's executor parses. Three kinds share the
:class:`Teacher` protocol: any OpenAI-compatible chat endpoint (the paper's
strong teacher), a registered cleaner (e.g. the exact ``oracle`` of the embedded
counter task) and a plain function (tests, ad-hoc oracles).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from freelm.cleaners.base import Cleaner
from freelm.data import Problem
from freelm.http_limits import bounded_httpx_client, reply_cap, reply_limit, with_transport_reason
from freelm.prompts import MARKS, PROBLEM_MARK, template_skeleton
from freelm.redact import redact


@dataclass
class TeacherReply:
    """The teacher's raw answer (parsed by the project's executor) and what it cost."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TeacherError(RuntimeError):
    """The teacher could not answer (after its own retries): the example stays undecided."""


class Teacher(Protocol):
    """Suggests deletions for a thinking prefix; returns text in the Free-Module's JSON format."""

    name: str

    async def suggest(self, problem: Problem, thinking: str) -> TeacherReply: ...


@dataclass
class FunctionTeacher:
    """A local teacher from a function ``(problem, thinking) -> answer text``, e.g. an exact oracle of a synthetic task."""

    fn: Callable[[Problem, str], str]
    name: str = "function"

    async def suggest(self, problem: Problem, thinking: str) -> TeacherReply:
        return TeacherReply(self.fn(problem, thinking))


@dataclass
class CleanerTeacher:
    """A cleaner of the registry as teacher (``get_cleaner("oracle")``): its command text is the suggestion.

    Only a cleaner that answers in commands (``CleanOutcome.raw_output``) can
    teach; one that edits spans directly (``headtail``) is refused per call.
    """

    cleaner: Cleaner

    @property
    def name(self) -> str:
        return self.cleaner.name

    async def suggest(self, problem: Problem, thinking: str) -> TeacherReply:
        outcome = await self.cleaner.clean(problem.prompt, thinking)
        if outcome.raw_output is None:
            raise TeacherError(f"cleaner {self.cleaner.name!r} edits spans without commands: it cannot teach")
        return TeacherReply(outcome.raw_output, outcome.prompt_tokens, outcome.completion_tokens)


_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.DOTALL)


def teacher_messages(problem: str, thinking: str, template: str | Path | None = None) -> list[dict[str, str]]:
    """The cleaning prompt as chat messages, so a chat teacher reads exactly the Free-Module's instructions.

    The ChatML structure is read from the template's skeleton (placeholders
    still unfilled), so text inside the problem or the thinking can never split
    a message; the assistant pre-fill is dropped. A template that is not ChatML
    becomes one user message.
    """
    skeleton = template_skeleton(template)

    def fill(text: str) -> str:
        return MARKS.sub(lambda m: problem if m.group(0) == PROBLEM_MARK else thinking, text)

    messages = [
        {"role": role, "content": fill(body)} for role, body in _CHATML.findall(skeleton) if role != "assistant"
    ]
    return messages or [{"role": "user", "content": fill(skeleton)}]


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions endpoint (Gemini, vLLM, SGLang, OpenAI, ...).

    Retries of 429/5xx/timeouts are the ``openai`` client's own (``max_retries``,
    honouring ``Retry-After``); what still fails is a :class:`TeacherError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        *,
        template: str | Path | None = None,
        max_tokens: int = 4096,
        temperature: float = 0.0,
        timeout: float = 600.0,
        max_retries: int = 5,
    ):
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
            http_client=bounded_httpx_client(timeout),  # a teacher's reply is untrusted: bytes capped, deadline total
        )  # fmt: skip
        self._secret = api_key
        self.model = model
        self.template = template
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.name = f"openai:{model}"

    async def suggest(self, problem: Problem, thinking: str) -> TeacherReply:
        import openai

        try:
            with reply_cap(reply_limit(self.max_tokens)):  # read by the bounded client
                response = await self.client.chat.completions.create(
                    model=self.model,
                    messages=teacher_messages(problem.prompt, thinking, self.template),
                    max_tokens=self.max_tokens,
                    temperature=self.temperature,
                )
        except openai.OpenAIError as exc:
            raise TeacherError(
                redact(f"{type(exc).__name__}: {with_transport_reason(exc)}", [self._secret])[:500]
            ) from None
        # the client does not validate replies: any field may be missing or null
        choices = getattr(response, "choices", None)
        message = getattr(choices[0], "message", None) if choices else None
        if message is None:
            raise TeacherError(f"response without choices[0].message: {str(response)[:200]}")
        content = getattr(message, "content", None)
        usage = getattr(response, "usage", None)
        return TeacherReply(
            text=content if isinstance(content, str) else "",
            prompt_tokens=_count(getattr(usage, "prompt_tokens", None)),
            completion_tokens=_count(getattr(usage, "completion_tokens", None)),
        )

    async def aclose(self) -> None:
        await self.client.close()


def _count(value: object) -> int:
    """A token count from a server's usage block; anything but a non-negative int (null, a string) counts 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
