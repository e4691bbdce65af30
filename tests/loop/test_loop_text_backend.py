"""The loop over a text-only backend (OpenAI-compatible servers: text back, no token ids), on the counting model.

A chunk that ends inside a multi-byte character comes back from such a server
with a trailing U+FFFD. Re-encoding that would put a real replacement-character
token into the next prompt, which is not what the server generated; the loop
must drop the partial character and let the server generate it again.
"""

from __future__ import annotations

import asyncio

from freelm.backends.base import BackendError, GenerateResult
from freelm.cleaners import HeadTailCleaner
from freelm.loop import LoopConfig, run_rollout
from freelm.prompts import render_reasoning_prompt
from freelm.testing.counting import counting_answer, counting_tokenizer
from freelm.tokenizer import Tokenizer

PROBLEM = "Count to 2."


class TextOnlyServer:
    """A deterministic "model" whose whole output is ``text``; answers like an OpenAI completions server.

    It continues from wherever the context it is sent ends, which must be the
    prompt plus a prefix of ``text`` at one of its own token boundaries (else
    the client corrupted the context: a BackendError). Like llama-server, the
    reply is text only, a split character is U+FFFD, and ``completion_tokens``
    counts the eos token that was trimmed from the text.
    """

    name = "text-only"

    def __init__(self, tokenizer: Tokenizer, text: str):
        self.tokenizer = tokenizer
        self.prompt = render_reasoning_prompt(PROBLEM, tokenizer)
        self.ids = tokenizer.encode(text)
        self.contexts: list[str] = []

    async def generate(self, request):
        context = self.tokenizer.decode(request.input_ids)
        self.contexts.append(context)
        done = context.removeprefix(self.prompt)
        starts = {len(self.tokenizer.decode(self.ids[:k])): k for k in range(len(self.ids) + 1)}
        if not context.startswith(self.prompt) or done not in (
            self.tokenizer.decode(self.ids[:k]) for k in starts.values()
        ):
            raise BackendError(f"context is not what this server generated: ...{context[-20:]!r}")
        k = next(k for k in range(len(self.ids) + 1) if self.tokenizer.decode(self.ids[:k]) == done)
        out = self.ids[k : k + request.max_new_tokens]
        stop = k + len(out) >= len(self.ids) and len(out) < request.max_new_tokens
        return GenerateResult(
            text=self.tokenizer.decode(out),
            output_ids=[],
            finish_reason="stop" if stop else "length",
            prompt_tokens=len(request.input_ids),
            completion_tokens=len(out) + (1 if stop else 0),  # the eos, as the server counts it
        )

    async def aclose(self):
        return None


def test_split_character_at_a_chunk_boundary_is_regenerated_not_re_encoded():
    tokenizer = counting_tokenizer(2, steps=20)
    text = "é≤é step 1\nééé≤≤ step 2\n" + counting_answer(2)
    server = TextOnlyServer(tokenizer, text)
    split_at = [k for k in range(1, len(server.ids)) if tokenizer.decode(server.ids[:k]).endswith("\ufffd")]
    assert split_at, "the test text must split a character over tokens"
    # headtail with room for everything only chunks the generation: a boundary after every 3 tokens
    config = LoopConfig(clean_every=3, max_tokens=4000, context_limit=4000)
    cleaner = HeadTailCleaner(tokenizer, head_tokens=1000, tail_tokens=1000)
    result = asyncio.run(run_rollout(PROBLEM, reasoner=server, tokenizer=tokenizer, cleaner=cleaner, config=config))
    assert result.error is None and result.finish_reason == "stop"
    assert result.response == text
    assert all("\ufffd" not in c for c in server.contexts)  # no replacement character ever reached the server
    assert len(server.contexts) >= 8  # really chunked (until </think>, after which nothing is cleaned)
    # the eos the server trimmed from the text is counted as the server counts it
    assert result.rounds[-1].generated_tokens == result.rounds[-1].context_tokens - result.rounds[-1].prompt_tokens + 1


def test_one_call_equals_chunked_over_a_text_backend():
    tokenizer = counting_tokenizer(2, steps=20)
    text = "ü step 1\n≤ step 2\n" + counting_answer(2)
    one = asyncio.run(run_rollout(PROBLEM, reasoner=TextOnlyServer(tokenizer, text), tokenizer=tokenizer, cleaner=None))
    assert one.response == text and one.generated_tokens == len(tokenizer.encode(text)) + 1


def test_a_text_reply_longer_than_asked_never_grows_the_context_past_what_was_asked():
    """A server may claim few tokens and send a long text: the loop's own encoding of it is cut to the request's
    budget, so no round counts more tokens than asked and the context never passes the window."""

    class Flooding:
        name = "flooding"

        async def generate(self, request):
            return GenerateResult(
                text="step 1\n" * 20_000, output_ids=[], finish_reason="length",
                prompt_tokens=len(request.input_ids), completion_tokens=3,
            )  # fmt: skip

    tokenizer = counting_tokenizer(2, steps=20)
    config = LoopConfig(clean_every=16, max_tokens=64, context_limit=200)
    result = asyncio.run(run_rollout(PROBLEM, reasoner=Flooding(), tokenizer=tokenizer, cleaner=None, config=config))
    assert result.finish_reason in ("length", "context_overflow")
    assert result.peak_context_tokens < 200 and result.generated_tokens <= 64
    for rnd in result.rounds:
        assert rnd.context_tokens - rnd.prompt_tokens <= 64
