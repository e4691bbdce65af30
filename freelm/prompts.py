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
* Template introspection: :func:`template_skeleton` (where each placeholder
  lands in the rendered prompt) and its inverse :func:`recover_thinking` (the
  thinking a rendered cleaning prompt holds), so the SFT check, synthesis and
  ``freelm template infer`` read prompts with the same rules that write them.
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


def fill_template(text: str, problem: str, thinking: str) -> str:
    """A cleaning template's text with its placeholders filled.

    Substitution is a single pass over the template, so braces inside the
    problem or the thinking are never treated as placeholders.
    """
    values = {"problem": problem, "thinking": thinking}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def render_cleaning_prompt(problem: str, thinking: str, template: str | Path | None = None) -> str:
    """The cleaning-mode prompt for the current thinking (problem shown bare, without the suffix)."""
    return fill_template(load_clean_template(template), problem, thinking)


# --------------------------------------------------------------------------- template introspection

# Sentinels rendered through the real template: the skeleton shows where each placeholder went.
PROBLEM_MARK, THINKING_MARK = "\x00problem\x00", "\x00thinking\x00"
MARKS = re.compile(f"({re.escape(PROBLEM_MARK)}|{re.escape(THINKING_MARK)})")


def template_skeleton(template: str | Path | None = None) -> str:
    """The cleaning template rendered with :data:`PROBLEM_MARK` / :data:`THINKING_MARK` in place of the values."""
    return render_cleaning_prompt(PROBLEM_MARK, THINKING_MARK, template)


def _template_regex(template: str | Path | None, problem: str | None, greedy: bool) -> re.Pattern[str]:
    star = ".*" if greedy else ".*?"
    pattern, seen = [], set()
    for piece in MARKS.split(template_skeleton(template)):
        if piece == THINKING_MARK or (piece == PROBLEM_MARK and problem is None):
            name = "thinking" if piece == THINKING_MARK else "problem"
            pattern.append(f"(?P={name})" if name in seen else f"(?P<{name}>{star})")
            seen.add(name)
        elif piece == PROBLEM_MARK:
            pattern.append(re.escape(problem))
        else:
            pattern.append(re.escape(piece))
    return re.compile("".join(pattern), re.DOTALL)


def recover_thinking(prompt: str, template: str | Path | None = None, problem: str | None = None) -> str:
    """The thinking that ``render_cleaning_prompt(problem, thinking, template)`` turned into ``prompt``.

    With ``problem`` known the answer is unique. Without it, the template's
    literal text between the problem and the thinking could also occur inside
    either of them; the shortest and the longest problem reading are compared
    and a disagreement raises instead of guessing.
    """
    first = _template_regex(template, problem, greedy=True).fullmatch(prompt)
    if first is None:
        raise ValueError("prompt does not match the cleaning template" + (" and its problem" if problem else ""))
    if problem is None:
        other = _template_regex(template, None, greedy=False).fullmatch(prompt)
        if other is None or other.group("thinking") != first.group("thinking"):
            raise ValueError("cannot split the prompt into problem and thinking unambiguously (add a 'problem' field)")
    return first.group("thinking")
