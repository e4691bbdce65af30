"""The Free-Module cleaner: the base model with the LoRA adapter on, prompted to list deletions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from freelm.backends.base import Backend, GenerateRequest, SamplingParams
from freelm.cleaners.base import CleanOutcome
from freelm.free import apply_deletions, parse_commands
from freelm.prompts import render_cleaning_prompt


@dataclass
class LoRACleaner:
    """Calls ``backend`` with ``adapter`` on the cleaning prompt and executes the JSON it writes.

    The backend may be a different server (and model) than the reasoner: the
    paper runs the 8B Free-Module as the cleaner of much larger reasoners. The
    prompt is sent as text so the client needs no tokenizer for the cleaner's
    model.
    """

    backend: Backend
    adapter: str | None = "free"
    template: str | Path | None = None
    max_new_tokens: int = 1024
    sampling: SamplingParams = field(default_factory=SamplingParams.greedy)
    overlap: Literal["merge", "skip"] = "merge"
    name: str = "free"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        prompt = render_cleaning_prompt(problem, thinking, self.template)
        result = await self.backend.generate(
            GenerateRequest(
                text=prompt, max_new_tokens=self.max_new_tokens, sampling=self.sampling, adapter=self.adapter
            )
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
        )
