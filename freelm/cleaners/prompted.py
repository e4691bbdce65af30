"""What the Free-Module and the ICL baseline share: the cleaning prompt sent to a model, its JSON executed.

:class:`PromptedCleaner` is no cleaner of its own (it is not registered): a
cleaner that prompts a model subclasses it and says which adapter it calls,
the Free-Module its LoRA (:mod:`freelm.cleaners.free_module`), the ICL
baseline none (:mod:`freelm.cleaners.icl`). Everything else, the template, the
budgets, the window and the call, is this one class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from freelm.backends.base import Backend, ContextWindow, GenerateRequest, SamplingParams
from freelm.cleaners.base import CleanOutcome
from freelm.free import apply_deletions, parse_commands, remove_spans
from freelm.prompts import DEFAULT_CLEAN_TEMPLATE, load_clean_template, render_cleaning_prompt
from freelm.setting import setting
from freelm.tokenizer import Tokenizer


def template_digest(template: str | Path | None, settings: dict[str, Any]) -> str:
    """What the config hash stores of a template: its text's digest (loading it also checks the file)."""
    return hashlib.sha256(load_clean_template(template).encode()).hexdigest()


def effective_reserve(reserve: int, settings: dict[str, Any]) -> int:
    """The reserve actually kept (:meth:`PromptedCleaner.headroom`): never more than an answer's budget."""
    return min(reserve, settings["max_new_tokens"])


@dataclass
class PromptedCleaner:
    """Calls ``backend`` with ``adapter`` on the cleaning prompt and executes the JSON it writes.

    The backend may be a different server (and model) than the reasoner: the
    paper runs the 8B Free-Module as the cleaner of much larger reasoners. The
    prompt is sent as text so the client needs no tokenizer for the cleaner's
    model.

    The window: with ``window`` (the cleaner server's, :class:`ContextWindow`,
    handed over by the registry once the servers have reported it) and
    ``tokenizer`` (to count the prompt), each call asks for at most the room
    the window leaves (SGLang refuses a prompt + ``max_new_tokens`` past it),
    and a prompt that leaves no room is not sent: the outcome says ``no_room``.
    :meth:`headroom` tells the loop how far the thinking may grow before a
    cleaning call would have less than ``reserve`` tokens to answer in, so it
    cleans before that.
    """

    backend: Backend
    #: the adapter it calls (the registry's declared field of a model-calling cleaner); None: the base model
    adapter: str | None = None
    template: str | Path | None = setting(
        None, flag="--clean-template", type=Path, metavar="FILE", hash_key="template_sha256",
        hash_value=template_digest, help=f"cleaning prompt template (default: {DEFAULT_CLEAN_TEMPLATE.name})",
    )  # fmt: skip
    max_new_tokens: int = setting(1024, flag="--clean-max-tokens", minimum=1, help="max tokens of one cleaner answer")
    sampling: SamplingParams = setting(default_factory=SamplingParams.greedy, help="fixed: greedy")
    overlap: Literal["merge", "skip"] = "merge"
    name: str = "prompted"
    window: ContextWindow | None = None
    tokenizer: Tokenizer | None = None
    reserve: int = setting(
        256, flag="--clean-reserve", minimum=1, hash_value=effective_reserve,
        help="near the cleaner's window, clean early while a cleaning call still has this many tokens "
        "(at most --clean-max-tokens) to answer in",
    )  # fmt: skip
    _frame_tokens: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def headroom(self, problem: str, thinking_tokens: int) -> int | None:
        """Tokens the thinking may still grow by before a cleaning call would have < ``reserve`` room; None: unbounded."""
        if self.window is None or self.tokenizer is None:
            return None
        prompt = self._frame_size(problem) + thinking_tokens
        reserve = effective_reserve(self.reserve, {"max_new_tokens": self.max_new_tokens})
        return min(self.window.max_input - prompt, self.window.max_total - reserve - prompt)

    def _frame_size(self, problem: str) -> int:
        """Tokens of the cleaning prompt around the thinking: fixed per problem, and the loop asks every round."""
        size = self._frame_tokens.get(problem)
        if size is None:
            if len(self._frame_tokens) >= 4096:  # one entry per problem in flight is all that is reused
                self._frame_tokens.clear()
            size = len(self.tokenizer.encode(render_cleaning_prompt(problem, "", self.template)))
            self._frame_tokens[problem] = size
        return size

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
            endpoint=result.endpoint,
        )
