"""The embedded default's synthetic long-horizon task: a counter turned many times.

A problem gives a two-digit counter ``x0`` and a number of turns ``n``. Each turn
adds 37 modulo 100. The solution writes one short line per turn, labelled with
the number of turns still to go::

    #47 42
    #46 79
    #45 16
    ...
    #0 81
    </think>
    \\boxed{ 81}

Why this shape: every line depends only on the line before it, so once a line is
written all earlier lines are obsolete. A model that forgets them needs a context
of a few lines whatever ``n`` is, while a model that keeps everything needs
``~4 n`` tokens and is cut off at a small context limit. Deleting the LAST line
instead loses the state, so a wrong deletion is visible in the answer.

Why these tokens (measured, see docs/embedded.md): a tiny transformer learns a
step quickly when the tokens it needs are distinct by CONTENT, not only by
position. The label ``#17`` is a bare-number token and the counter `` 42`` a
space-number token, so "the previous label" and "the previous value" are each
the most recent token of their kind. For the same reason the start value is the
last space-number in the prompt (``adds 37``, ``mod 100`` come before it). Counting DOWN makes stopping a local
decision (after ``#0``) instead of a comparison with ``n`` in the problem, which
the model learned last and worst when the labels counted up. An earlier design with three dials written
as separate digits (``#17 8 9 0``), each needing the digit exactly one line up,
stayed at chance on the digits after 500 CPU steps.

The ``#k`` label also makes every line's start unique (``#1 `` is not a
substring of ``#11 ``), which is what lets deletion anchors resolve uniquely.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from freelm.cleaners.oracle import LINE_RE  # one line of the solution: ``#k x``, as the oracle reads it

SOURCE = "counter"
#: What one turn adds. Coprime to 100, so the counter repeats only every 100 turns: within a solution
#: no value repeats, and a turn's value cannot be copied from an earlier line.
STEP = 37
MODULUS = 100

_PROMPT = "A counter adds 37 each turn, mod 100. It starts at {start}. What does it show after turn #{turns}?"
_PROMPT_RE = re.compile(
    r"A counter adds 37 each turn, mod 100\. It starts at (\d+)\. What does it show after turn #(\d+)\?"
)


@dataclass(frozen=True)
class CounterProblem:
    """One problem; ``prompt`` is what the model reads, the other fields what it must infer."""

    id: str
    start: int
    turns: int

    @property
    def prompt(self) -> str:
        return _PROMPT.format(start=self.start, turns=self.turns)

    def state(self, turn: int) -> int:
        return (self.start + turn * STEP) % MODULUS

    @property
    def answer(self) -> int:
        return self.state(self.turns)

    def to_row(self) -> dict[str, str]:
        """The evaluation format shared with the benchmark JSONL files."""
        return {"id": self.id, "source": SOURCE, "prompt": self.prompt, "answer": str(self.answer)}


def parse_problem(prompt: str) -> CounterProblem:
    """Recover a problem from its prompt text (the oracle and the scorer only see text)."""
    match = _PROMPT_RE.search(prompt)
    if not match:
        raise ValueError(f"not a counter problem: {prompt[:80]!r}")
    g = [int(x) for x in match.groups()]
    return CounterProblem(id="", start=g[0], turns=g[1])


def held_out(start: int, turns: int) -> bool:
    """The test split: one (start, turns) pair in five, never drawn for training.

    There are only 100 x 11 distinct problems at 40-50 turns and pretraining
    draws thousands, so without a split every benchmark problem would also be a
    training problem. With it the benchmark measures a model on problems it has
    never seen (each start value and each length was seen, never together).
    """
    return (start + turns) % 5 == 0


def generate_problems(
    count: int, seed: int, min_turns: int = 40, max_turns: int = 50, split: str | None = None
) -> list[CounterProblem]:
    """``count`` seeded problems with ``min_turns..max_turns`` turns; ``split`` "train"/"test" keeps one side of
    :func:`held_out` (``None``: both)."""
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"need 1 <= min_turns <= max_turns, got {min_turns}, {max_turns}")
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}")
    rng = random.Random(seed)
    problems: list[CounterProblem] = []
    while len(problems) < count:
        start = rng.randrange(MODULUS)
        turns = rng.randint(min_turns, max_turns)
        if split is None or held_out(start, turns) == (split == "test"):
            problems.append(CounterProblem(id=f"counter-{seed}-{len(problems):04d}", start=start, turns=turns))
    return problems


def line(turns_left: int, value: int) -> str:
    return f"#{turns_left} {value}\n"


def final_answer(problem: CounterProblem) -> str:
    """What follows the thinking: the close tag and the boxed answer.

    The space in ``\\boxed{ 81}`` is deliberate: it makes the answer the same
    token as the counter value in the last line (`` 81``), a copy; ``{81}`` is
    tokenized as two digits the model would have to learn to spell. The grader
    ignores the space.
    """
    return f"</think>\n\\boxed{{ {problem.answer}}}"


def solution(problem: CounterProblem | str) -> str:
    """The full response after ``<think>\\n``: one line per turn, ``</think>``, the boxed answer."""
    p = parse_problem(problem) if isinstance(problem, str) else problem
    return "".join(line(p.turns - t, p.state(t)) for t in range(p.turns + 1)) + final_answer(p)


def continuation(problem: CounterProblem | str, thinking: str) -> str:
    """The exact rest of the response given the thinking so far, read from its last complete line only.

    This is how a correct reasoner must behave after a deletion: everything it
    needs is the problem and the last complete line (plus the partial line after
    it). Raises ``ValueError`` when the text left cannot be continued, e.g. when
    the line holding the current state was deleted.
    """
    p = parse_problem(problem) if isinstance(problem, str) else problem
    complete = [m for m in LINE_RE.finditer(thinking) if thinking[m.end() : m.end() + 1] == "\n"]
    next_turn = p.turns - int(complete[-1].group(1)) + 1 if complete else 0
    tail = thinking[complete[-1].end() + 1 :] if complete else thinking
    rest = "".join(line(p.turns - t, p.state(t)) for t in range(next_turn, p.turns + 1)) + final_answer(p)
    if not rest.startswith(tail):
        raise ValueError(f"{tail[-40:]!r} does not continue the solution: the state it needs is lost or wrong")
    return rest[len(tail) :]
