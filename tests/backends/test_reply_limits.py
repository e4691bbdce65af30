"""Replies a broken or hostile server sends, on both remote backends: every one is a transient error of its request.

A 200 whose body never ends, a reply dripping a byte at a time, a well-formed
reply with more tokens than asked, and a server that accepts connections and
never answers its health or start-up probes. Each fault is the SGLang-protocol
stand-in's (``freelm/testing/sglang_faults.py``), over real HTTP; the next
request on the same backend succeeds (the connection pool is not poisoned).
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest
from backend_calls import call, scripted_server_fixture

from freelm import http_limits as transport
from freelm.backends.base import GenerateRequest, TransientBackendError
from freelm.backends.openai_compat import OpenAIBackend
from freelm.backends.sglang import SGLangBackend
from freelm.http_limits import reply_limit

scripted_server = scripted_server_fixture({None: "thinking along", "free": "[]"}, served_model_name="m")

BACKENDS = {
    "sglang": lambda url, **kw: SGLangBackend(url, max_retries=0, **kw),
    "openai": lambda url, **kw: OpenAIBackend(url + "/v1", "m", max_retries=0, **kw),
}


@pytest.fixture(params=sorted(BACKENDS))
def make(request, scripted_server):
    scripted_server.reset()
    scripted_server.resume_answering()
    return lambda **kw: BACKENDS[request.param](scripted_server.url, **kw)


def outcome(make, coro_fn, deadline: float, **kw):
    """``coro_fn(backend)`` on a fresh backend: (result or the exception, seconds); fails past ``deadline``."""

    async def go(backend):
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(coro_fn(backend), deadline)
        except TransientBackendError as exc:
            result = exc
        after = await backend.generate(GenerateRequest(8, text="again"))  # the same client still works
        assert after.text.startswith("thinking")
        return result, time.perf_counter() - started

    return call(lambda: make(**kw), go)


def test_a_body_that_never_ends_stops_at_the_cap_with_memory_bounded(make, scripted_server):
    async def measured(backend):
        await backend.generate(GenerateRequest(1, text="warm up"))  # the client's own first-call allocations
        scripted_server.endless_body_next()
        tracemalloc.start()
        try:
            await backend.generate(GenerateRequest(16, text="q"))
        except TransientBackendError as exc:
            return exc, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    (error, peak), _ = outcome(make, measured, deadline=20)
    assert isinstance(error, TransientBackendError) and f"reply larger than {reply_limit(16):,} bytes" in str(error)
    assert peak < 4 * reply_limit(16)  # the cap plus the chunks in flight, not what the server sent


def test_a_reply_dripping_a_byte_at_a_time_ends_at_the_total_deadline(make, scripted_server):
    scripted_server.drip_next(seconds_per_byte=0.1)  # a ~300-byte answer: 30 s, but every read comes in time
    error, seconds = outcome(make, lambda b: b.generate(GenerateRequest(16, text="q")), deadline=20, timeout=1.5)
    assert isinstance(error, TransientBackendError) and "no complete reply within 1.5s" in str(error)
    assert seconds < 10


@pytest.mark.parametrize("tokens, asked", [(5_000, 16), (2_000_000, 4_096)])
def test_a_reply_with_more_tokens_than_asked_is_refused(make, scripted_server, tokens, asked):
    scripted_server.overlong_next(tokens)
    error, _ = outcome(make, lambda b: b.generate(GenerateRequest(asked, text="q")), deadline=60)
    assert isinstance(error, TransientBackendError)
    # under the byte cap the count refuses it; 2,000,000 ids of SGLang's JSON pass the cap first
    assert f"reply holds {tokens:,} tokens for a request of at most {asked:,}" in str(error) or (
        "reply larger than" in str(error)
    )


def test_probes_of_a_server_that_never_answers_end_at_the_probe_deadline(make, scripted_server, monkeypatch):
    monkeypatch.setattr(transport, "PROBE_TIMEOUT_S", 1.0)  # the request timeout stays 600 s

    async def probes(backend):
        scripted_server.stop_answering()
        try:
            healthy = await backend.health()
            try:
                await backend.server_limits()
                limits_error = None
            except TransientBackendError as exc:
                limits_error = str(exc)
        finally:
            scripted_server.resume_answering()
        return healthy, limits_error

    (healthy, limits_error), seconds = outcome(make, probes, deadline=30)
    assert healthy is False and seconds < 15
    # SGLang's /server_info times out; the OpenAI route falls back to "reports nothing" (ServerLimits())
    assert limits_error is None or "no complete reply within 1s" in limits_error
