"""Final-answer extraction: the last ``\\boxed{...}`` after ``</think>``.

Only the text after the thinking block counts: a box inside the (pruned)
thinking is a draft, not an answer, and a response cut off before ``</think>``
has not answered at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from freelm.prompts import THINK_CLOSE

# \boxed{, \boxed {, \fbox{ ; the brace itself is matched by the scanner below.
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character, or a brace

Unanswered = Literal["no_think_close", "no_box", "empty_box"]


@dataclass(frozen=True)
class Extraction:
    answer: str | None  # None: unanswered
    reason: Unanswered | None = None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``/``\\fbox{...}`` in ``text``; nested braces allowed.

    One pass over the braces with a stack (escaped braces ``\\{`` do not count),
    so the time is linear in ``len(text)`` however many boxes or nesting levels
    the answer holds; scanning from every box was quadratic (65 s for 16,000
    nested levels).
    """
    boxes = {m.end() - 1 for m in _BOX_OPEN.finditer(text)}  # positions of the boxes' opening braces
    if not boxes:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None
    for token in _BRACE_TOKEN.finditer(text, min(boxes)):
        if token.group() == "{":
            stack.append(token.start())
        elif token.group() == "}" and stack:
            opened = stack.pop()
            if opened in boxes and (best is None or opened > best[0]):
                best = (opened, token.start())
    return None if best is None else text[best[0] + 1 : best[1]]


def extract_answer(response: str) -> Extraction:
    """The graded answer of a runner ``response`` (text after the prompt's ``<think>\\n``)."""
    head, sep, tail = response.rpartition(THINK_CLOSE)
    if not sep:
        return Extraction(None, "no_think_close")
    boxed = last_boxed(tail)
    if boxed is None:
        return Extraction(None, "no_box")
    boxed = boxed.strip()
    if not boxed:
        return Extraction(None, "empty_box")
    return Extraction(boxed)
