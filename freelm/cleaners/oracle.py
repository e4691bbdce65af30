"""The exact oracle of the embedded counter task, as a cleaner (``--cleaner oracle``) and as the demo's teacher.

In a counter solution (``freelm/demo/task.py``) only the last complete line is
ever needed again (the next line is computed from it alone), so the ideal
cleaning deletes every complete line before it in ONE span: ``prefix`` is the
label of the first line (``"#17 "``, unique because labels are), ``suffix`` is
the whole line before the last complete one including its newline (the first
match after the prefix is that line itself, since the label makes it unique).
A partial line after the last complete one is kept: generation resumes inside it.

In the loop it is the upper bound for a learned Free-Module on that task: with
it, what remains wrong is the base model's (resuming after a deletion), not
the cleaner's (docs/embedded.md). On other tasks it finds no counter lines and
deletes nothing. The demo builds its training targets from the same functions
(:func:`oracle_output`), so the cleaner and the teacher cannot disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from freelm.cleaners.base import CleanOutcome
from freelm.cleaners.registry import register
from freelm.free import Deletion, apply_deletions, format_commands

#: One line of a counter solution: ``#k x`` (without its newline).
LINE_RE = re.compile(r"#(\d+) (\d+)")


def complete_lines(thinking: str) -> list[tuple[int, int, str]]:
    """``(start, end_after_newline, label)`` of every well-formed line that starts a line and ends in ``\\n``."""
    found = []
    for m in LINE_RE.finditer(thinking):
        at_line_start = m.start() == 0 or thinking[m.start() - 1] == "\n"
        if at_line_start and thinking[m.end() : m.end() + 1] == "\n":
            found.append((m.start(), m.end() + 1, m.group(1)))
    return found


def span_command(thinking: str, first_start: int, first_label: str, last: tuple[int, int, str]) -> Deletion:
    """One command from the line at ``first_start`` through the complete line ``last``.

    The suffix is searched only after the prefix, so when ``last`` is the first
    line itself the suffix is the rest of that line, not the whole line.
    """
    prefix = f"#{first_label} "
    last_start, last_end, _ = last
    return Deletion(prefix=prefix, suffix=thinking[max(last_start, first_start + len(prefix)) : last_end])


def oracle_deletions(thinking: str) -> list[Deletion]:
    """Delete everything before the last complete line; ``[]`` when there is nothing to delete.

    The anchors are checked against :func:`freelm.free.apply_deletions`: when the
    thinking is malformed (e.g. a model repeated a label) and they would not
    delete exactly the intended span, the oracle says ``[]`` rather than guess.
    """
    lines = complete_lines(thinking)
    if len(lines) < 2:
        return []
    first_start, _, first_label = lines[0]
    _, last_deleted_end, _ = lines[-2]
    commands = [span_command(thinking, first_start, first_label, lines[-2])]
    if apply_deletions(thinking, commands).spans != [(first_start, last_deleted_end)]:
        return []
    return commands


def oracle_output(thinking: str) -> str:
    """The text the Free-Module is trained to write for this thinking (canonical JSON)."""
    return format_commands(oracle_deletions(thinking))


@register
@dataclass
class OracleCleaner:
    """Deletes every complete counter line before the last one, as :func:`oracle_deletions` says."""

    name: str = "oracle"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        commands = oracle_deletions(thinking)
        return CleanOutcome(edit=apply_deletions(thinking, commands), raw_output=format_commands(commands))
