"""Reasoning and cleaning prompts: the one source of truth for what the model sees.

The same functions render prompts at inference (``loop``) and when building the
Free-Module's training data (``training``), so a trained adapter always sees the
format it was trained on.

* Reasoning prompt: the model's chat template applied to the problem (plus
  :data:`PROBLEM_SUFFIX`), ending with ``<think>\\n``; everything the model writes
  after it is the "response", and the text before ``</think>`` is the only
  editable region.
* Cleaning prompt: a template file with ``{problem}`` and ``{thinking}``
  placeholders rendered into the complete raw prompt, ending where the adapter
  writes its JSON. The upstream prompt is not public: point ``--clean-template``
  at a file to match another adapter's training format.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from freelm.tokenizer import Tokenizer

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

#: Appended to every problem statement (benchmarks store the bare problem).
PROBLEM_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."

DEFAULT_CLEAN_TEMPLATE = Path(__file__).parent / "templates" / "clean.txt"

_PLACEHOLDER = re.compile(r"\{(problem|thinking)\}")


def user_message(problem: str, suffix: str = PROBLEM_SUFFIX) -> str:
    return f"{problem}\n\n{suffix}" if suffix else problem


def render_reasoning_prompt(problem: str, tokenizer: Tokenizer | None = None, suffix: str = PROBLEM_SUFFIX) -> str:
    """The reasoning-mode prompt, ending with ``<think>\\n``.

    Uses the tokenizer's chat template when it has one (``enable_thinking=True``),
    else the built-in Qwen3 ChatML form.
    """
    messages = [{"role": "user", "content": user_message(problem, suffix)}]
    if tokenizer is not None and tokenizer.has_chat_template:
        prompt = tokenizer.apply_chat_template(messages, enable_thinking=True)
    else:
        prompt = f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    if not prompt.rstrip().endswith(THINK_OPEN):
        prompt += f"{THINK_OPEN}\n"
    return prompt


@lru_cache(maxsize=16)
def load_clean_template(path: str | Path | None = None) -> str:
    """Read a cleaning template; it must contain both ``{problem}`` and ``{thinking}``."""
    path = Path(path) if path else DEFAULT_CLEAN_TEMPLATE
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read cleaning template {path}: {exc}") from exc
    found = set(_PLACEHOLDER.findall(template))
    missing = {"problem", "thinking"} - found
    if missing:
        raise ValueError(
            f"cleaning template {path} lacks placeholder(s): {', '.join('{' + m + '}' for m in sorted(missing))}"
        )
    return template


def render_cleaning_prompt(problem: str, thinking: str, template: str | Path | None = None) -> str:
    """The cleaning-mode prompt for the current thinking (problem shown bare, without the suffix).

    Substitution is a single pass over the template, so braces inside the
    problem or the thinking are never treated as placeholders.
    """
    values = {"problem": problem, "thinking": thinking}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], load_clean_template(template))
