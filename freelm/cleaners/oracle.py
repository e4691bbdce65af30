"""The exact oracle of the embedded counter task as a cleaner (``--cleaner oracle``).

The upper bound for a learned Free-Module on that task: with it in the loop,
what remains wrong is the base model's (resuming after a deletion), not the
cleaner's (docs/embedded.md). On other tasks it finds no counter lines and
deletes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from freelm.cleaners.base import CleanOutcome
from freelm.cleaners.registry import register
from freelm.demo.oracle import oracle_deletions
from freelm.free import apply_deletions, format_commands


@register
@dataclass
class OracleCleaner:
    """Deletes every complete counter line before the last one, as :func:`~freelm.demo.oracle.oracle_deletions` says."""

    name: str = "oracle"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        commands = oracle_deletions(thinking)
        return CleanOutcome(edit=apply_deletions(thinking, commands), raw_output=format_commands(commands))
