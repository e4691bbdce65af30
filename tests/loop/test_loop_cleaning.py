"""What a cleaning round may touch: the token ids before the first deletion stay verbatim, the prompt never changes.

The counting model's own generation is re-tokenized identically, which hides
whether the loop keeps the generated ids or re-encodes them; here the reasoner
emits one token per character, an encoding the tokenizer never produces itself
(a real model's sampled ids differ from the tokenizer's canonical encoding the
same way), so the two are told apart.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from freelm.backends.base import GenerateRequest, GenerateResult
from freelm.cleaners import FreeModuleCleaner
from freelm.cleaners.base import CleanOutcome
from freelm.free import Deletion, apply_deletions
from freelm.loop import LoopConfig, run_rollout
from freelm.prompts import render_reasoning_prompt
from freelm.testing.counting import CountingBackend, counting_answer, counting_tokenizer

TARGET = 30
PROBLEM = "Count to 30 in steps: step 1, step 2, ... (the template and this text are out of reach)."
_STEP = re.compile(r"step \d+\n")
TOKENIZER = counting_tokenizer(TARGET)


@dataclass
class CharIdsBackend:
    """The counting model, answering one token id per character (decodes to the same text)."""

    inner: CountingBackend
    requests: list[GenerateRequest] = field(default_factory=list)
    name: str = "char-ids"

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await self.inner.generate(request)
        if request.adapter is None:
            self.requests.append(request)
            result.output_ids = char_ids(result.text)
            result.completion_tokens = len(result.output_ids)
        return result

    async def aclose(self) -> None:
        return None


def char_ids(text: str) -> list[int]:
    ids = [TOKENIZER.encode(ch) for ch in text]
    assert all(len(i) == 1 for i in ids), "every character of the counting text is one token"
    return [i[0] for i in ids]


class KeepFirstAndLast:
    """Deletes from the SECOND step line through the second-to-last one: the first line is kept."""

    name = "keep-first-and-last"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        lines = _STEP.findall(thinking)
        commands = [Deletion(lines[1], lines[-2])] if len(lines) >= 4 else []
        return CleanOutcome(edit=apply_deletions(thinking, commands))


def test_ids_before_the_first_deletion_are_kept_verbatim_not_re_encoded():
    backend = CharIdsBackend(CountingBackend(TOKENIZER, target=TARGET))
    config = LoopConfig(clean_every=40, max_tokens=2000, context_limit=2000)
    result = asyncio.run(
        run_rollout(PROBLEM, reasoner=backend, tokenizer=TOKENIZER, cleaner=KeepFirstAndLast(), config=config)
    )
    assert result.finish_reason == "stop" and result.response.endswith(counting_answer(TARGET))
    head = char_ids("step 1\n")
    assert TOKENIZER.encode("step 1\n") != head  # the tokenizer alone would never produce these ids
    cleaned = [(i, r) for i, r in enumerate(result.rounds) if r.clean is not None and r.clean.deleted_spans]
    assert len(cleaned) >= 2
    prompt = result.prompt_tokens
    for i, rnd in cleaned:
        first_deleted = rnd.clean.deleted_spans[0][0]
        assert first_deleted == len("step 1\n")
        before, after = backend.requests[i], backend.requests[i + 1]
        previous_context = before.input_ids + char_ids(rnd.generated_text)
        # the generated ids up to the first deleted character are sent again unchanged...
        assert after.input_ids[: prompt + first_deleted] == previous_context[: prompt + first_deleted]
        assert after.input_ids[prompt : prompt + first_deleted] == head
        # ...and the record's claim about the reusable prefix is exactly that
        assert result.rounds[i + 1].reused_tokens == prompt + first_deleted


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_cleaning_never_touches_the_prompt(data):
    """Commands anchored in the problem, the template, across the prompt/thinking border or in the thinking:
    every reasoning request still starts with the unchanged prompt ids, and the cleaner sees only the thinking."""
    prompt_text = render_reasoning_prompt(PROBLEM, TOKENIZER)
    thinking = "".join(f"step {n}\n" for n in range(1, 12))
    context = prompt_text + thinking
    anchor = st.integers(0, len(context) - 1).flatmap(
        lambda i: st.integers(i + 1, min(len(context), i + 12)).map(lambda j: context[i:j])
    )
    commands = data.draw(st.lists(st.tuples(anchor, anchor), min_size=1, max_size=4))
    border = prompt_text[-10:] + thinking[:8]  # starts in the template, ends in the thinking
    commands.append((border, "step 3\n"))
    script = json.dumps([{"prefix": p, "suffix": s} for p, s in commands])

    reasoner = CharIdsBackend(CountingBackend(TOKENIZER, target=TARGET))
    cleaner_backend = CountingBackend(TOKENIZER, target=TARGET, clean_responses=deque([script] * 3))
    config = LoopConfig(clean_every=30, max_tokens=400, context_limit=2000, max_clean_rounds=3)
    result = asyncio.run(
        run_rollout(
            PROBLEM, reasoner=reasoner, tokenizer=TOKENIZER, cleaner=FreeModuleCleaner(cleaner_backend), config=config
        )
    )
    prompt_ids = TOKENIZER.encode(prompt_text)
    assert result.prompt_tokens == len(prompt_ids)
    assert all(r.input_ids[: len(prompt_ids)] == prompt_ids for r in reasoner.requests)
    cleans = [r.clean for r in result.rounds if r.clean is not None]
    assert cleans and all(c.parse_error is None for c in cleans)
    border_skips = [s for c in cleans for s in c.skipped if s["prefix"] == border]
    assert len(border_skips) == len(cleans) and {s["reason"] for s in border_skips} == {"prefix_not_found"}
    assert cleaner_backend.clean_calls == len(cleans)


def test_the_cleaner_is_shown_the_thinking_alone():
    seen: list[tuple[str, str]] = []

    class Spy:
        name = "spy"

        async def clean(self, problem: str, thinking: str) -> CleanOutcome:
            seen.append((problem, thinking))
            return CleanOutcome(edit=apply_deletions(thinking, []))

    backend = CountingBackend(TOKENIZER, target=TARGET)
    config = LoopConfig(clean_every=30, max_tokens=2000, context_limit=2000)
    result = asyncio.run(run_rollout(PROBLEM, reasoner=backend, tokenizer=TOKENIZER, cleaner=Spy(), config=config))
    assert len(seen) == result.cleaning_rounds >= 2
    for problem, thinking in seen:
        assert problem == PROBLEM and thinking.startswith("step 1\n") and result.response.startswith(thinking)
        assert "<|im_start|>" not in thinking and "Count to" not in thinking
