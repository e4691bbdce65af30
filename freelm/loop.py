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
plus the template. A cleaner that knows its window (``PromptedCleaner.headroom``)
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

from freelm.backends.base import (
    Backend,
    BackendError,
    ContextLengthError,
    ContextWindow,
    GenerateRequest,
    SamplingParams,
)
from freelm.backends.pool import rollout_affinity
from freelm.cleaners.base import Cleaner
from freelm.prompts import PROBLEM_SUFFIX, THINK_CLOSE, render_reasoning_prompt
from freelm.records import CleanRecord, RolloutResult, RoundRecord
from freelm.schedule import MID_CHARACTER, CleaningSchedule, may_clean
from freelm.setting import check_fields, group, setting
from freelm.tokenizer import Tokenizer


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
            new_ids = tokenizer.encode(whole)
            counted = result.completion_tokens or len(new_ids)  # its own tokenization may differ from ours
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
        )
        rounds.append(record)
        text = new_text
        reused = context  # the server caches prompt + output

        if result.finish_reason == "stop":
            finish = "stop"
        elif result.finish_reason == "abort":
            finish, error = "error", "reasoner aborted the request"
        elif not new_ids and not (split_char and counted):
            finish, error = "error", "reasoner returned no tokens without stopping"
        elif cleaning_on and schedule.due(since_clean, len(new_ids), room, headroom) and may_clean(text):
            # (a mid-character boundary is cleaned a token later: since_clean stays due)
            record.clean, ids, text, reused = await _clean(problem, text, ids, prompt_ids, tokenizer, cleaner)
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


def _clean_headroom(cleaner: Cleaner, problem: str, thinking_tokens: int) -> int | None:
    """Tokens the next chunk may add before a cleaning call would lose its reserve; None: no bound applies.

    Only a cleaner that knows its window has one (``PromptedCleaner.headroom``);
    whether it is worth an early call is the schedule's rule
    (:meth:`~freelm.schedule.CleaningSchedule.early`). A cleaning call that
    cannot fit is recorded as ``no_room``.
    """
    headroom = getattr(cleaner, "headroom", None)
    return headroom(problem, thinking_tokens) if headroom is not None else None


async def _clean(
    problem: str, text: str, ids: list[int], prompt_ids: list[int], tokenizer: Tokenizer, cleaner: Cleaner
) -> tuple[CleanRecord, list[int], str, int]:
    """One cleaning round. Returns the record, the new response ids and text, and the reusable prefix length."""
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
        return record, ids, text, before
    edit = outcome.edit
    if edit.spans:
        keep = tokenizer.common_prefix_tokens(ids, text, edit.spans[0][0])
        head = tokenizer.decode(ids[:keep])
        ids = ids[:keep] + tokenizer.encode(edit.text[len(head) :])
        text = tokenizer.decode(ids)
        reusable = len(prompt_ids) + keep
    else:
        reusable = before
    after = len(prompt_ids) + len(ids)
    record = CleanRecord(
        cleaner=cleaner.name,
        context_tokens_before=before,
        context_tokens_after=after,
        deleted_spans=list(edit.spans),
        chars_deleted=edit.chars_deleted,
        tokens_deleted=before - after,
        applied=len(edit.applied),
        skipped=[{**d.to_dict(), "reason": reason} for d, reason in edit.skipped],
        parse_error=outcome.parse_error,
        dropped=outcome.dropped,
        raw_output=outcome.raw_output,
        prompt_tokens=outcome.prompt_tokens,
        completion_tokens=outcome.completion_tokens,
        cached_tokens=outcome.cached_tokens,
        latency_s=time.perf_counter() - started,
        max_new_tokens=outcome.max_new_tokens,
        no_room=outcome.no_room,
        endpoint=outcome.endpoint,
    )
    return record, ids, text, reusable
