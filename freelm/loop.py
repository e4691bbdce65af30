"""One Free()LM rollout: reasoning mode and cleaning mode, alternating.

What the model sees
-------------------
Reasoning mode sends ``prompt_ids + response_ids`` to the reasoner with no
adapter. ``prompt_ids`` is the rendered reasoning prompt (chat template applied
to the problem, ending with ``<think>\\n``) and never changes; ``response_ids`` is
everything generated since, minus what cleaning deleted. Generation runs in
chunks of at most ``clean_every`` tokens; when a chunk ends in a cleaning point
is :mod:`freelm.schedule`'s rule, shared with synthesis and the demo's data.

After each full chunk, while the response is still inside ``<think>`` (no
``</think>`` yet), cleaning mode asks the cleaner about the thinking text (only
that text is editable: the problem and template are out of reach). The edit is
applied to the text; the token ids before the first deleted character are kept
verbatim and only the remainder is re-tokenized, so the server's prefix (radix)
cache still covers the unchanged prefix (SGLang's radix cache reuses only the
longest common token prefix, ``srt/mem_cache/radix_cache.py``: every token after
the first deleted one is prefilled again). Reasoning then resumes on the pruned context.

Budgets and the window
----------------------
``max_tokens`` caps the tokens the reasoner generates in total (deleted ones
included); ``context_limit`` bounds the context (prompt + response stay below
it). The reasoner's server has its own window (:class:`ContextWindow`, learned
from the server by the runner: SGLang refuses a prompt of ``max_req_input_len``
tokens or more and silently caps ``max_new_tokens`` to ``max_req_len - input -
1``); every request asks for exactly the room both leave, so no request is one
the server refuses. Running out of room ends the rollout as
``context_overflow`` exactly as a vanilla run is truncated (and so does a
server's "context exceeded" 400 on a reasoning call: the text is kept and
graded), running out of ``max_tokens`` as ``length``. With no cleaner
(vanilla) the whole budget is one call.
A prompt that cannot fit ends as ``context_overflow`` at once, after tokenizing
only a prefix that already fills the window (``prompt_tokens`` then counts it).

The cleaning call obeys its server's window too: its prompt is the thinking
plus the template. A cleaner that knows its window (``LoRACleaner.headroom``)
makes the loop end a reasoning chunk early and clean while the call still has
its reserve to answer in; the call asks for at most the room left, and one that
cannot fit at all is recorded (``clean.no_room``) instead of sent.

Everything measured is recorded per round (:class:`~freelm.records.RoundRecord`)
and per rollout (:class:`~freelm.records.RolloutResult`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from freelm.backends.base import (
    RESUME_STRATEGIES,
    Backend,
    BackendError,
    ContextLengthError,
    ContextWindow,
    Eviction,
    GenerateRequest,
    SamplingParams,
)
from freelm.backends.pool import rollout_affinity
from freelm.cleaners.base import Cleaner
from freelm.prompts import PROBLEM_SUFFIX, THINK_CLOSE, render_reasoning_prompt
from freelm.records import MAX_ANCHOR_CHARS, MAX_RAW_OUTPUT_CHARS, CleanRecord, RolloutResult, RoundRecord, clip
from freelm.schedule import MID_CHARACTER, CleaningSchedule, may_clean
from freelm.setting import check_fields, group, setting
from freelm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from freelm.free import Edit


@dataclass(frozen=True)
class LoopConfig:
    """Settings of one rollout. The paper does not report most of these values, so each one is configurable.

    Each field is a setting (:mod:`freelm.setting`): its runner flag, help,
    bounds and hash key are declared here and nowhere else, so a new
    results-deciding setting is one field (``hash_default=False`` keeps the
    hashes of earlier runs while it is at its default).
    """

    clean_every: int = setting(
        4096, flag="--clean-every", metavar="N", minimum=1, cleaning=True, help="clean after every N generated tokens"
    )
    max_tokens: int = setting(
        32768, flag="--max-tokens", metavar="N", minimum=1,
        help="total generation budget per rollout (deleted tokens count)",
    )  # fmt: skip
    context_limit: int = setting(
        40960, flag="--context-limit", metavar="N", minimum=1,
        help="context budget of a rollout (prompt + response stay below it); the servers' own windows, "
        "read from them (SGLang /server_info, /v1/models max_model_len), apply as well; a server that reports "
        "none is taken to serve exactly this window",
    )  # fmt: skip
    max_clean_rounds: int | None = setting(
        None, flag="--max-clean-rounds", type=int, metavar="N", minimum=0, cleaning=True,
        help="cap on cleaning rounds per rollout (default: none)",
    )  # fmt: skip
    sampling: SamplingParams = group(SamplingParams, "reasoner sampling (defaults: Qwen3 thinking mode; always sent)")
    problem_suffix: str = setting(
        PROBLEM_SUFFIX, flag="--problem-suffix", metavar="TEXT", help="instruction appended to every problem"
    )
    resume: str = setting(
        "reprefill", flag="--resume", choices=RESUME_STRATEGIES, hash_default=False, cleaning=True,
        help="how reasoning resumes after a deletion: reprefill (the pruned text is sent again, the engine prefills "
        "everything after the first deleted token; what servers do), evict-gaps (the in-process engine evicts the "
        "deleted tokens' KV, the kept ones keep their positions: Memento's scheme) or evict-rerotate (evicts, then "
        "re-rotates the kept keys to contiguous positions: kvpress); evict-* need --backend local (docs/free.md)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def schedule(self) -> CleaningSchedule:
        return CleaningSchedule(self.clean_every)


#: A prompt longer than this many characters per window token is first tokenized by a prefix (see _encode_prompt).
_PROBE_CHARS_PER_TOKEN = 8
#: Tokens a cut prefix may gain over the whole text at the cut (a split word): never decide overflow within this.
_PROBE_MARGIN = 64


def _encode_prompt(tokenizer: Tokenizer, prompt: str, context_limit: int) -> list[int]:
    """The prompt's ids, or for a prompt that cannot fit the window, the ids of a prefix that already fills it.

    A huge problem statement (a pasted file, a broken data row) would otherwise
    be tokenized whole (minutes for 50 MB) only to end as ``context_overflow``.
    Prefixes grow 4x per try, so a long prompt that does fit costs at most about
    a third more than one full tokenization, and one that does not fit costs
    one tokenization of a prefix a few times the window.
    """
    size = context_limit * _PROBE_CHARS_PER_TOKEN
    while size < len(prompt):
        ids = tokenizer.encode(prompt[:size])
        if len(ids) >= context_limit + _PROBE_MARGIN:
            return ids
        size *= 4
    return tokenizer.encode(prompt)


def _call_seed(seed: int | None, index: int) -> int | None:
    """A distinct, reproducible seed per reasoning call of a rollout."""
    return None if seed is None else (seed * 1_000_003 + index) % (2**31 - 1)


@rollout_affinity
async def run_rollout(
    problem: str,
    *,
    reasoner: Backend,
    tokenizer: Tokenizer,
    cleaner: Cleaner | None,
    config: LoopConfig = LoopConfig(),
    seed: int | None = None,
    initial_response: str = "",
    window: ContextWindow | None = None,
) -> RolloutResult:
    """Run one rollout to completion; never raises on model output or backend failure.

    ``initial_response`` continues from a given (e.g. pruned) partial thinking,
    which is how reward filtering compares pruned and unpruned contexts.
    ``window`` is the reasoner server's window (None: ``config.context_limit`` only).
    """
    started = time.perf_counter()
    schedule = config.schedule
    window = ContextWindow.budget(config.context_limit).narrow(window)
    prompt = render_reasoning_prompt(problem, tokenizer, config.problem_suffix)
    prompt_ids = _encode_prompt(tokenizer, prompt, config.context_limit)
    ids = tokenizer.encode(initial_response)
    text = tokenizer.decode(ids)
    rounds: list[RoundRecord] = []
    generated = 0
    peak = len(prompt_ids) + len(ids)
    since_clean = 0
    reused = 0  # prompt tokens shared with what the server saw last (its prefix cache)
    eviction: Eviction | None = None  # what the last cleaning deleted, for an engine that evicts it in place
    # context tokens the server has never computed (None before the first call: all of them, and none again):
    # the last output token (sampled, never fed), unless a cleaning deleted it
    unfed: int | None = None
    finish, error = None, None
    split_char = False  # a text-only backend's last chunk ended inside a character (dropped, to be regenerated)

    while finish is None:
        context = len(prompt_ids) + len(ids)
        room = window.room(context)  # what the server serves in full; 0 once it would refuse the prompt
        left = config.max_tokens - generated
        if room <= 0 or left <= 0:
            finish = "context_overflow" if room <= left else "length"
            break
        cleaning_on = (
            cleaner is not None
            and THINK_CLOSE not in text
            and (
                config.max_clean_rounds is None
                or sum(r.clean is not None and r.clean.no_room is None for r in rounds) < config.max_clean_rounds
            )
        )
        budget = min(room, left, schedule.chunk(since_clean, split_char)) if cleaning_on else min(room, left)
        headroom = schedule.early(_clean_headroom(cleaner, problem, len(ids))) if cleaning_on else None
        if headroom is not None:
            budget = min(budget, headroom)  # stop where the cleaning call would lose its reserve
        request = GenerateRequest(
            input_ids=prompt_ids + ids,
            max_new_tokens=budget,
            sampling=config.sampling,
            seed=_call_seed(seed, len(rounds)),
            eviction=eviction,
        )
        try:
            result = await reasoner.generate(request)
        except ContextLengthError as exc:  # the server's window is smaller than it said: the rollout is full
            finish, error = "context_overflow", f"reasoner: {exc}"
            break
        except BackendError as exc:
            message = str(exc)  # a pool's message already starts with its name ("reasoner: gave up ...")
            finish, error = "error", message if message.startswith("reasoner") else f"reasoner: {message}"
            break
        if result.output_ids:
            new_ids, counted = result.output_ids, max(len(result.output_ids), result.completion_tokens)
        else:  # text only: never re-encode a split character's U+FFFD; count what the server did (eos included)
            whole = result.text.rstrip(MID_CHARACTER) if result.finish_reason == "length" else result.text
            split_char = len(whole) < len(result.text)
            # its own tokenization may differ from ours; past the budget the text is not what was asked for (a
            # server claiming few tokens can send any text): cut to it, so the context never passes the window
            new_ids = tokenizer.encode(whole)[:budget]
            counted = min(result.completion_tokens or len(new_ids), budget)
        ids = ids + new_ids
        new_text = tokenizer.decode(ids)
        # < len(text) only if a split character completed; commonprefix is a Python loop over the characters
        # (14 ms for 95k), so the usual case is one startswith
        kept = len(text) if new_text.startswith(text) else len(os.path.commonprefix([text, new_text]))
        generated += counted
        since_clean += len(new_ids)
        context = len(prompt_ids) + len(ids)
        peak = max(peak, context)
        record = RoundRecord(
            index=len(rounds),
            generated_text=new_text[kept:],
            generated_tokens=counted,
            prompt_tokens=len(request.input_ids),
            context_tokens=context,
            reused_tokens=reused,
            cached_tokens=result.cached_tokens,
            finish_reason=result.finish_reason,
            latency_s=result.latency_s,
            rewound_chars=len(text) - kept,
            endpoint=result.endpoint,
            evicted_tokens=result.evicted_tokens,
            rerotated_tokens=result.rerotated_tokens,
            reprefilled_tokens=_recomputed(len(request.input_ids), result.cached_tokens, unfed),
        )
        rounds.append(record)
        text = new_text
        reused = context  # the server caches prompt + output
        eviction, unfed = None, 1

        if result.finish_reason == "stop":
            finish = "stop"
        elif result.finish_reason == "abort":
            finish, error = "error", "reasoner aborted the request"
        elif not new_ids and not (split_char and counted):
            finish, error = "error", "reasoner returned no tokens without stopping"
        elif cleaning_on and schedule.due(since_clean, len(new_ids), room, headroom) and may_clean(text):
            # (a mid-character boundary is cleaned a token later: since_clean stays due)
            resumed = await _clean(problem, text, ids, prompt_ids, tokenizer, cleaner, config.resume)
            record.clean, ids, text, reused = resumed.record, resumed.ids, resumed.text, resumed.reused
            eviction, unfed = resumed.eviction, 0 if resumed.last_token_deleted else 1
            since_clean = 0

    return RolloutResult(
        response=text,
        finish_reason=finish,
        prompt_tokens=len(prompt_ids),
        generated_tokens=generated,
        final_context_tokens=len(prompt_ids) + len(ids),
        peak_context_tokens=peak,
        rounds=rounds,
        wall_time_s=time.perf_counter() - started,
        error=error,
    )


def _recomputed(input_tokens: int, cached: int | None, unfed: int | None) -> int | None:
    """Tokens a call computed although the server had computed them for this rollout before (None: not reported)."""
    if cached is None:
        return None
    return 0 if unfed is None else max(0, input_tokens - cached - unfed)


def _clean_headroom(cleaner: Cleaner, problem: str, thinking_tokens: int) -> int | None:
    """Tokens the next chunk may add before a cleaning call would lose its reserve; None: no bound applies.

    Only a cleaner that knows its window has one (``LoRACleaner.headroom``);
    whether it is worth an early call is the schedule's rule
    (:meth:`~freelm.schedule.CleaningSchedule.early`). A cleaning call that
    cannot fit is recorded as ``no_room``.
    """
    headroom = getattr(cleaner, "headroom", None)
    return headroom(problem, thinking_tokens) if headroom is not None else None


@dataclass
class _Resumed:
    """A cleaning round's outcome: its record and the context reasoning resumes on."""

    record: CleanRecord
    ids: list[int]  # the new response ids
    text: str
    reused: int  # prompt tokens equal to the previous request's prefix (the client's view of a prefix cache)
    eviction: Eviction | None = None  # the deleted token ranges, for an engine that evicts them in place
    last_token_deleted: bool = False  # the previous call's last output token (never fed to the model) went too


async def _clean(
    problem: str,
    text: str,
    ids: list[int],
    prompt_ids: list[int],
    tokenizer: Tokenizer,
    cleaner: Cleaner,
    resume: str = "reprefill",
) -> _Resumed:
    """One cleaning round, and the response reasoning resumes on (its ids built for the ``resume`` strategy)."""
    before = len(prompt_ids) + len(ids)
    started = time.perf_counter()
    try:
        outcome = await cleaner.clean(problem, text)
    except Exception as exc:  # a dead or broken cleaner costs this round, never the rollout
        error = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
        record = CleanRecord(
            cleaner=cleaner.name, context_tokens_before=before, context_tokens_after=before,
            latency_s=time.perf_counter() - started, error=error,
        )  # fmt: skip
        return _Resumed(record, ids, text, before)
    edit = outcome.edit
    eviction = None
    if not edit.spans:
        new_ids, shared = ids, len(ids)
    elif resume == "reprefill":
        new_ids, shared = _reencoded_after(tokenizer, ids, text, edit.text, edit.spans[0][0])
    else:
        new_ids, shared, removed = _whole_tokens_removed(tokenizer, ids, text, edit)
        if removed:
            eviction = Eviction(resume, tuple((len(prompt_ids) + a, len(prompt_ids) + b) for a, b in removed))
    after = len(prompt_ids) + len(new_ids)
    record = CleanRecord(
        cleaner=cleaner.name,
        context_tokens_before=before,
        context_tokens_after=after,
        deleted_spans=list(edit.spans),
        chars_deleted=edit.chars_deleted,
        tokens_deleted=before - after,
        applied=len(edit.applied),
        skipped=[
            {"prefix": clip(d.prefix, MAX_ANCHOR_CHARS), "suffix": clip(d.suffix, MAX_ANCHOR_CHARS), "reason": reason}
            for d, reason in edit.skipped
        ],
        parse_error=outcome.parse_error,
        dropped=outcome.dropped,
        raw_output=None if outcome.raw_output is None else clip(outcome.raw_output, MAX_RAW_OUTPUT_CHARS),
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        cached_tokens=outcome.cached_tokens,
        latency_s=time.perf_counter() - started,
        max_new_tokens=outcome.max_new_tokens,
        no_room=outcome.no_room,
        endpoint=outcome.endpoint,
    )
    last_deleted = bool(edit.spans) and edit.spans[-1][1] == len(text)
    text = tokenizer.decode(new_ids) if edit.spans else text
    return _Resumed(record, new_ids, text, len(prompt_ids) + shared, eviction, last_deleted)


def _reencoded_after(
    tokenizer: Tokenizer, ids: list[int], text: str, new_text: str, char: int
) -> tuple[list[int], int]:
    """Re-prefill's ids: those before character ``char`` verbatim, the rest of ``new_text`` re-encoded.

    Returns the ids and how many lead ones were kept (a server's prefix cache still covers them).
    """
    keep = tokenizer.common_prefix_tokens(ids, text, char)
    head = tokenizer.decode(ids[:keep])
    return ids[:keep] + tokenizer.encode(new_text[len(head) :]), keep


def _whole_tokens_removed(
    tokenizer: Tokenizer, ids: list[int], text: str, edit: Edit
) -> tuple[list[int], int, list[tuple[int, int]]]:
    """Eviction's ids: each deleted span removed as whole tokens, every other id kept verbatim (so is its KV).

    A span whose two ends fall on token boundaries is removed as the tokens
    between them. From the first span that does not (a deletion starting or
    ending inside a token), the rest of the text is re-encoded, as re-prefill
    does: that tail is prefilled again. Returns the ids, how many lead ids are
    unchanged, and the removed ``[start, end)`` token ranges of ``ids``.
    """
    removed: list[tuple[int, int]] = []
    cut = None  # the first span not on token boundaries
    for start, end in edit.spans:
        first, last = _token_boundary(tokenizer, ids, text, start), _token_boundary(tokenizer, ids, text, end)
        if first is None or last is None:
            cut = start
            break
        removed.append((first, last))
    upto = len(ids) if cut is None else tokenizer.common_prefix_tokens(ids, text, cut)
    new_ids, last = [], 0
    for first, end in removed:
        new_ids += ids[last:first]
        last = end
    new_ids += ids[last:upto]
    if cut is not None:
        new_ids += tokenizer.encode(edit.text[len(tokenizer.decode(new_ids)) :])
    if tokenizer.decode(new_ids) != edit.text:  # never seen; a tokenizer whose pieces do not concatenate
        reencoded, shared = _reencoded_after(tokenizer, ids, text, edit.text, edit.spans[0][0])
        return reencoded, shared, []
    return new_ids, removed[0][0] if removed else upto, removed


def _token_boundary(tokenizer: Tokenizer, ids: list[int], text: str, char: int) -> int | None:
    """The number of lead tokens that decode to exactly ``text[:char]``; None when ``char`` falls inside a token."""
    k = tokenizer.common_prefix_tokens(ids, text, char)
    return k if len(tokenizer.decode(ids[:k])) == char else None
