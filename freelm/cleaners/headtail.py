"""Head-and-tail truncation: a non-learned baseline ("heuristic compression").

Keeps the opening of the thinking (where the model usually restates the problem
and its plan) and the most recent text, and deletes the middle, in the spirit of
Delethink's carry-over. Cuts snap to line boundaries so no line is left half
deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

from freelm.cleaners.base import CleanOutcome
from freelm.cleaners.registry import register
from freelm.free import remove_spans
from freelm.setting import setting
from freelm.tokenizer import Tokenizer


@register
@dataclass
class HeadTailCleaner:
    """Delete everything between the first ``head_tokens`` and the last ``tail_tokens`` tokens."""

    tokenizer: Tokenizer
    head_tokens: int = setting(256, flag="--head-tokens", minimum=1, help="tokens kept at the start")
    tail_tokens: int = setting(1024, flag="--tail-tokens", minimum=1, help="tokens kept at the end")
    name: str = "headtail"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        ids = self.tokenizer.encode(thinking)
        if len(ids) <= self.head_tokens + self.tail_tokens:
            return CleanOutcome(edit=remove_spans(thinking, []))
        start = len(self.tokenizer.decode(ids[: self.head_tokens]))
        end = len(thinking) - len(self.tokenizer.decode(ids[len(ids) - self.tail_tokens :]))
        newline = thinking.find("\n", start, end)
        start = newline + 1 if newline >= 0 else start
        newline = thinking.rfind("\n", start, end)
        end = newline + 1 if newline >= 0 else end
        return CleanOutcome(edit=remove_spans(thinking, [(start, end)] if start < end else []))
