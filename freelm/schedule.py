"""When a rollout is cleaned: the one schedule of cleaning points.

Free()LM cleans every N generated tokens while the model is still thinking. The
loop (:func:`freelm.loop.run_rollout`) follows the schedule live, one reasoning
chunk at a time; synthesis (:func:`freelm.training.cuts.cut_trajectory`) and the
embedded default's training data (:func:`freelm.demo.corpus.cleaning_states`)
replay it on a finished solution to find the thinking a cleaner is shown there.
All three ask this module, so training data is cut exactly where inference
cleans. The rules:

* a boundary every ``every`` tokens generated since the last cleaning (or the
  start): :meth:`CleaningSchedule.chunk` and :meth:`~CleaningSchedule.points`;
* cleaning only while thinking, and never mid-character (:func:`may_clean`): a
  byte-level token can end inside a multi-byte character, whose decoded text
  then ends in U+FFFD. The loop cleans a few tokens later, when the character
  is complete; a replay drops that boundary;
* early cleaning (:meth:`~CleaningSchedule.early`): a cleaner that knows its
  window ends a chunk early, so that its call keeps ``--clean-reserve`` tokens
  to answer in; a chunk cut short by the reasoner's window is cleaned too
  (:meth:`~CleaningSchedule.due`);
* a boundary at the very end of a trajectory has nothing after it and is not
  replayed.

Pure Python: no tokenizer, no backend, so every user can share it.
"""

from __future__ import annotations

from dataclasses import dataclass

from freelm.prompts import THINK_CLOSE

#: What a decoder prints for an incomplete UTF-8 character (a token split it).
MID_CHARACTER = "\ufffd"
#: A UTF-8 character is at most 4 bytes: a byte-level tokenizer completes it within 4 tokens.
MAX_CHAR_TOKENS = 4


def may_clean(thinking: str) -> bool:
    """Whether a cleaner may be shown ``thinking`` at a boundary: the thinking is still open and ends on a whole character."""
    return THINK_CLOSE not in thinking and not thinking.endswith(MID_CHARACTER)


@dataclass(frozen=True)
class CleaningSchedule:
    """Clean every ``every`` generated tokens (``--clean-every``), earlier when the cleaner's window says so."""

    every: int

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"the cleaning interval must be >= 1 token, got {self.every}")

    def chunk(self, since_clean: int, split_char: bool = False) -> int:
        """Tokens the next reasoning call may generate before the boundary.

        At or past the boundary (a mid-character one is deferred) the call
        still gets 1 token, or :data:`MAX_CHAR_TOKENS` while a character a
        text-only server split is completed.
        """
        return max(MAX_CHAR_TOKENS if split_char else 1, self.every - since_clean)

    def early(self, headroom: int | None) -> int | None:
        """The cleaner's headroom as a bound on the next chunk; None when no early cleaning applies.

        A headroom under a quarter chunk means cleaning no longer frees enough
        room to be worth an early call: reasoning then runs on in normal chunks
        and each cleaning call takes the room that is left.
        """
        return headroom if headroom is not None and headroom >= max(1, self.every // 4) else None

    def due(self, since_clean: int, new_tokens: int, room: int, headroom: int | None) -> bool:
        """Clean after a full chunk, or after a chunk cut short by the reasoner's window or the cleaner's headroom."""
        return since_clean >= self.every or new_tokens >= room or (headroom is not None and new_tokens >= headroom)

    def points(self, length: int) -> range:
        """The boundaries of a trajectory nothing was deleted from: ``every``, ``2 * every``, ... below ``length``.

        ``length`` counts the trajectory's tokens; a boundary at ``length``
        itself has no continuation. After a deletion the count restarts, so a
        replay that deletes (the demo's) reads each chunk as ``ids[n - every : n]``.
        """
        return range(self.every, length, self.every)
