"""The cleaner interface: given the problem and the thinking so far, say what to delete.

One small interface (in the spirit of kvpress' presses) so that the Free-Module,
the vanilla no-op and non-learned baselines are interchangeable in the loop and
in the runner's ``--cleaner`` flag. A cleaner returns an :class:`~freelm.free.Edit`
of the thinking text; the loop owns the token bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from freelm.free import Edit


@dataclass
class CleanOutcome:
    """A cleaner's answer for one round, with what is needed for telemetry."""

    edit: Edit
    raw_output: str | None = None
    parse_error: str | None = None
    dropped: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    max_new_tokens: int | None = None  # the answer budget the call was sent with (capped to the window)
    no_room: str | None = None  # why no call was sent: the prompt leaves no room in the cleaner's window
    endpoint: str | None = None  # the server that answered the call


@runtime_checkable
class Cleaner(Protocol):
    """``clean`` must not raise on bad model output; backend failures may raise ``BackendError``.

    The loop still treats ANY exception from ``clean`` as a failed round (recorded in
    ``CleanRecord.error``), so a cleaner bug costs one round, never the rollout.
    """

    name: str

    async def clean(self, problem: str, thinking: str) -> CleanOutcome: ...
