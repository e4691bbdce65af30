"""The embedded default's synthetic long-horizon task: turning a lock's dials.

A problem gives three dials (digits), a key (three digits) and a number of turns
``n``. Each turn adds the key to the dials digit by digit, modulo 10. The
solution writes one short line per turn::

    #0 5 2 9
    #1 8 9 0
    ...
    #47 4 1 3
    </think>
    \\boxed{413}

Why this shape: every line depends only on the line before it and on the key in
the problem, so once a line is written all earlier lines are obsolete. A model
that forgets them needs a context of a few lines whatever ``n`` is, while a model
that keeps everything needs ``~6 n`` tokens and is cut off at a small context
limit. Deleting the LAST line instead makes the state unrecoverable, so a wrong
deletion is visible in the answer. The per-line rule (add a digit mod 10, count
the label up) is easy enough for a tiny transformer to learn on CPU in minutes.

The ``#k`` label makes every line's start unique (``#1 `` is not a substring of
``#11 ``), which is what lets deletion anchors resolve uniquely.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SOURCE = "dials"
DIALS = 3

_PROMPT = (
    "Three dials show {start}. Each turn adds {key} digit by digit, mod 10. What do they show after turn #{turns}?"
)
_PROMPT_RE = re.compile(
    r"Three dials show (\d) (\d) (\d)\. Each turn adds (\d) (\d) (\d) digit by digit, mod 10\. "
    r"What do they show after turn #(\d+)\?"
)
#: One line of the solution: ``#k d d d`` (without its newline).
LINE_RE = re.compile(r"#(\d+) (\d) (\d) (\d)")


@dataclass(frozen=True)
class DialsProblem:
    """One problem; ``prompt`` is what the model reads, the other fields what it must infer."""

    id: str
    start: tuple[int, ...]
    key: tuple[int, ...]
    turns: int

    @property
    def prompt(self) -> str:
        return _PROMPT.format(start=_digits(self.start), key=_digits(self.key), turns=self.turns)

    def state(self, turn: int) -> tuple[int, ...]:
        return tuple((s + turn * k) % 10 for s, k in zip(self.start, self.key, strict=True))

    @property
    def answer(self) -> int:
        """The final dials read as a number (leading zeros drop: ``0 4 7`` -> 47, as math-verify grades)."""
        return int("".join(map(str, self.state(self.turns))))

    def to_row(self) -> dict[str, str]:
        """The evaluation format shared with the benchmark JSONL files."""
        return {"id": self.id, "source": SOURCE, "prompt": self.prompt, "answer": str(self.answer)}


def _digits(values: tuple[int, ...]) -> str:
    return " ".join(map(str, values))


def parse_problem(prompt: str) -> DialsProblem:
    """Recover a problem from its prompt text (the oracle and the scorer only see text)."""
    match = _PROMPT_RE.search(prompt)
    if not match:
        raise ValueError(f"not a dials problem: {prompt[:80]!r}")
    g = [int(x) for x in match.groups()]
    return DialsProblem(id="", start=tuple(g[0:3]), key=tuple(g[3:6]), turns=g[6])


def generate_problems(count: int, seed: int, min_turns: int = 30, max_turns: int = 40) -> list[DialsProblem]:
    """``count`` seeded problems with ``min_turns..max_turns`` turns.

    The key always has a digit coprime to 10, so the dials only repeat after 10
    turns and no two lines within a window of 10 coincide.
    """
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
    rng = random.Random(seed)
    problems = []
    for i in range(count):
        start = tuple(rng.randrange(10) for _ in range(DIALS))
        while True:
            key = tuple(rng.randrange(10) for _ in range(DIALS))
            if any(k in (1, 3, 7, 9) for k in key):
                break
        turns = rng.randint(min_turns, max_turns)
        problems.append(DialsProblem(id=f"dials-{seed}-{i:04d}", start=start, key=key, turns=turns))
    return problems


def line(turn: int, state: tuple[int, ...]) -> str:
    return f"#{turn} {_digits(state)}\n"


def final_answer(problem: DialsProblem) -> str:
    """What follows the thinking: the close tag and the boxed answer."""
    return f"</think>\n\\boxed{{{''.join(map(str, problem.state(problem.turns)))}}}"


def solution(problem: DialsProblem | str) -> str:
    """The full response after ``<think>\\n``: one line per turn, ``</think>``, the boxed answer."""
    p = parse_problem(problem) if isinstance(problem, str) else problem
    return "".join(line(t, p.state(t)) for t in range(p.turns + 1)) + final_answer(p)


def continuation(problem: DialsProblem | str, thinking: str) -> str:
    """The exact rest of the response given the thinking so far, read from its last complete line only.

    This is how a correct reasoner must behave after a deletion: everything it
    needs is the problem and the last complete line (plus the partial line after
    it). Raises ``ValueError`` when the text left cannot be continued, e.g. when
    the line holding the current state was deleted.
    """
    p = parse_problem(problem) if isinstance(problem, str) else problem
    complete = [m for m in LINE_RE.finditer(thinking) if thinking[m.end() : m.end() + 1] == "\n"]
    next_turn = int(complete[-1].group(1)) + 1 if complete else 0
    tail = thinking[complete[-1].end() + 1 :] if complete else thinking
    rest = "".join(line(t, p.state(t)) for t in range(next_turn, p.turns + 1)) + final_answer(p)
    if not rest.startswith(tail):
        raise ValueError(f"{tail[-40:]!r} does not continue the solution: the state it needs is lost or wrong")
    return rest[len(tail) :]
