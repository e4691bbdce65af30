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

Unanswered = Literal["no_think_close", "no_box", "empty_box"]


@dataclass(frozen=True)
class Extraction:
    answer: str | None  # None: unanswered
    reason: Unanswered | None = None


def _matching_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index`` (escaped braces ``\\{`` do not count)."""
    depth = 0
    i = open_index
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``/``\\fbox{...}`` in ``text``; nested braces allowed."""
    found = None
    for match in _BOX_OPEN.finditer(text):
        close = _matching_brace(text, match.end() - 1)
        if close is not None:
            found = text[match.end() : close]
    return found


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
