"""The Free-Module cleaner: the base model with the LoRA adapter on, prompted to list deletions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from freelm.backends.base import Backend, ContextWindow, GenerateRequest, SamplingParams
from freelm.cleaners.base import CleanOutcome
from freelm.free import apply_deletions, parse_commands, remove_spans
from freelm.prompts import render_cleaning_prompt
from freelm.tokenizer import Tokenizer


@dataclass
class LoRACleaner:
    """Calls ``backend`` with ``adapter`` on the cleaning prompt and executes the JSON it writes.

    The backend may be a different server (and model) than the reasoner: the
    paper runs the 8B Free-Module as the cleaner of much larger reasoners. The
    prompt is sent as text so the client needs no tokenizer for the cleaner's
    model.

    The window: with ``window`` (the cleaner server's, :class:`ContextWindow`)
    and ``tokenizer`` (to count the prompt), each call asks for at most the room
    the window leaves (SGLang refuses a prompt + ``max_new_tokens`` past it), and a
    prompt that leaves no room is not sent: the outcome says ``no_room``.
    :meth:`headroom` tells the loop how far the thinking may grow before a
    cleaning call would have less than ``reserve`` tokens to answer in, so it
    cleans before that.
    """

    backend: Backend
    adapter: str | None = "free"
    template: str | Path | None = None
    max_new_tokens: int = 1024
    sampling: SamplingParams = field(default_factory=SamplingParams.greedy)
    overlap: Literal["merge", "skip"] = "merge"
    name: str = "free"
    window: ContextWindow | None = None
    tokenizer: Tokenizer | None = None
    reserve: int = 256

    def headroom(self, problem: str, thinking_tokens: int) -> int | None:
        """Tokens the thinking may still grow by before a cleaning call would have < ``reserve`` room; None: unbounded."""
        if self.window is None or self.tokenizer is None:
            return None
        prompt = len(self.tokenizer.encode(render_cleaning_prompt(problem, "", self.template))) + thinking_tokens
        reserve = min(self.reserve, self.max_new_tokens)
        return min(self.window.max_input - prompt, self.window.max_total - reserve - prompt)

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        prompt = render_cleaning_prompt(problem, thinking, self.template)
        budget = self.max_new_tokens
        if self.window is not None and self.tokenizer is not None:
            prompt_tokens = len(self.tokenizer.encode(prompt))
            budget = min(budget, self.window.room(prompt_tokens))
            if budget < 1:
                return CleanOutcome(
                    edit=remove_spans(thinking, []),
                    prompt_tokens=prompt_tokens,
                    no_room=f"cleaning prompt of {prompt_tokens} tokens leaves no room in the cleaner's window "
                    f"(at most {self.window.max_input} input, {self.window.max_total} in all; {self.window.source})",
                )
        result = await self.backend.generate(
            GenerateRequest(text=prompt, max_new_tokens=budget, sampling=self.sampling, adapter=self.adapter)
        )
        commands = parse_commands(result.text)
        return CleanOutcome(
            edit=apply_deletions(thinking, commands, overlap=self.overlap),
            raw_output=result.text,
            parse_error=commands.error,
            dropped=commands.dropped,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cached_tokens=result.cached_tokens,
            max_new_tokens=budget,
        )
