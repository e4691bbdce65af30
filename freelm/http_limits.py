"""The limits every HTTP exchange with a model server obeys: a byte cap per reply and a deadline per call.

Why: a server's reply is untrusted. A 200 whose body never ends grew the
runner's memory by about 400 MB/s until the machine killed it (the body was read
whole), and a reply that drips one byte at a time never trips a per-read
timeout. So every reply is read with a byte cap, and every call has a total
deadline covering the whole reply; exceeding either fails that one request
(a transient error the caller retries: the runner's backends, the LLM judge,
the synthesis teacher), never the run's problem. A core module, so that every
layer that talks to a server (backends, evaluation, training) reads replies
the same way.

The cap is derived from what was asked: a generation reply may hold
:data:`REPLY_BYTES_PER_TOKEN` bytes per requested token plus
:data:`REPLY_OVERHEAD_BYTES` (JSON keys, ``meta_info``, usage); any other reply
(health, ``/server_info``, ``/v1/models``) :data:`INFO_REPLY_BYTES`. 1 KiB per
token is far above any real reply (SGLang's ``/generate`` is about 10-20 bytes
per token: the text and the id; llama-server's logprobs about 200), so a
legitimate reply never hits it, and a 32,768-token call still tops out at
33 MiB.

Start-up and health probes get their own short deadline, :func:`probe_timeout`:
an endpoint that accepts connections and never answers must cost seconds, not
the 10-minute request timeout.

The aiohttp client (SGLang) reads through :func:`read_capped`; the httpx
client under the openai SDK (the OpenAI-compatible backends, the judge, the
teacher) is :func:`bounded_httpx_client`, which reads the cap set with
:func:`reply_cap` for the call in progress (:data:`INFO_REPLY_BYTES` outside one).
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Bytes a generation reply may hold per token asked for (text + id + logprobs, JSON-escaped, generously).
REPLY_BYTES_PER_TOKEN = 1024
#: Bytes on top of that for the rest of a generation reply.
REPLY_OVERHEAD_BYTES = 1 << 20
#: Bytes any other reply may hold (a ``/v1/models`` listing hundreds of adapters is well under 1 MiB).
INFO_REPLY_BYTES = 8 << 20
#: Seconds a health or start-up probe may take in all. SGLang's own health check waits 20 s for its
#: 1-token generation (``entrypoints/http_server.py``: ``HEALTH_CHECK_TIMEOUT``).
PROBE_TIMEOUT_S = 20.0


class ReplyTooLarge(Exception):
    """A reply longer than its cap: the read stopped there (the caller maps it to a transient error)."""

    def __init__(self, url: str, limit: int):
        super().__init__(f"{url}: reply larger than {limit:,} bytes: stopped reading it (a broken or hostile server)")
        self.limit = limit


def with_transport_reason(exc: BaseException) -> str:
    """``exc``'s text with the transport's reason the openai SDK hides (its ``APIConnectionError`` reads
    "Connection error." over a reply cut at its cap; the cause says which): what a log line or a record keeps."""
    text, cause = str(exc), exc.__cause__
    return f"{text} ({cause})" if cause is not None and str(cause) and str(cause) not in text else text


def reply_limit(max_new_tokens: int | None = None) -> int:
    """The byte cap of a reply: to a generation call for ``max_new_tokens`` tokens, or to any other call."""
    if max_new_tokens is None:
        return INFO_REPLY_BYTES
    return REPLY_OVERHEAD_BYTES + REPLY_BYTES_PER_TOKEN * max(1, max_new_tokens)


def probe_timeout(timeout: float) -> float:
    """A probe's total deadline: :data:`PROBE_TIMEOUT_S`, or the request timeout when that is shorter."""
    return min(timeout, PROBE_TIMEOUT_S)


_cap: contextvars.ContextVar[int | None] = contextvars.ContextVar("freelm_reply_cap", default=None)


@contextmanager
def reply_cap(limit: int) -> Iterator[None]:
    """``with reply_cap(reply_limit(n)):`` the calls made inside (this task and those it starts) read at most ``limit``."""
    token = _cap.set(limit)
    try:
        yield
    finally:
        _cap.reset(token)


def current_reply_cap() -> int:
    """The cap of the call in progress (:func:`reply_cap`), else :data:`INFO_REPLY_BYTES`."""
    cap = _cap.get()
    return INFO_REPLY_BYTES if cap is None else cap


async def read_capped(response: Any, limit: int) -> bytes:
    """An aiohttp response's whole body, or :class:`ReplyTooLarge` as soon as it passes ``limit`` bytes.

    A declared ``Content-Length`` over the cap fails before reading anything;
    otherwise chunks are read until the cap, so memory never holds more than
    the cap plus one chunk. (aiohttp's total timeout covers this read.)
    """
    declared = response.content_length
    if declared is not None and declared > limit:
        raise ReplyTooLarge(str(response.url), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise ReplyTooLarge(str(response.url), limit)
        chunks.append(chunk)
    return b"".join(chunks)


def bounded_httpx_client(timeout: float) -> Any:
    """The openai SDK's own HTTP client class, every reply read whole under its cap and its call's total deadline.

    For ``AsyncOpenAI(http_client=...)``: the SDK's timeout is per read, so a
    reply dripping a byte at a time never ends; here the deadline is the whole
    exchange, the request's own timeout (the SDK sets it per call: ``timeout=``
    of a call overrides the client's). Over the deadline is the HTTP library's
    ``ReadTimeout``, over the cap (:func:`current_reply_cap`) its ``ReadError``
    caused by :class:`ReplyTooLarge`: the SDK raises them as ``APITimeoutError``
    and ``APIConnectionError``, both transient. Replies are asked uncompressed
    (``Accept-Encoding: identity``) and the cap counts decoded bytes. The reply
    is read before the SDK sees it, so a streamed call would get its reply at
    the end (no caller streams). The class extends ``openai.DefaultAsyncHttpxClient``
    (the SDK's defaults; httpx2 for openai 3, httpx before): a legacy httpx
    client cost the openai 3 SDK twice the client CPU per request (5.4 ms
    against 2.8 ms with 128 in flight against the stand-in; this class 3.2 ms
    against the SDK's own 3.4 ms in the same run).
    """
    return _bounded_client_class()(timeout=timeout, headers={"Accept-Encoding": "identity"})


@functools.cache
def _bounded_client_class() -> type:
    """The client class, defined on first use: the SDK is imported only by a backend that is built."""
    import asyncio
    import importlib

    import openai

    base = openai.DefaultAsyncHttpxClient
    http = importlib.import_module(
        next(c for c in base.__mro__ if c.__name__ == "AsyncClient").__module__.split(".")[0]
    )

    class BoundedAsyncClient(base):
        async def send(self, request: Any, **kwargs: Any) -> Any:
            timeout = (request.extensions.get("timeout") or {}).get("read")
            try:
                return await asyncio.wait_for(self._send_capped(request, **kwargs), timeout)
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                raise http.ReadTimeout(f"no complete reply within {timeout:g}s", request=request) from None

        async def _send_capped(self, request: Any, **kwargs: Any) -> Any:
            kwargs["stream"] = True
            response = await super().send(request, **kwargs)
            limit = current_reply_cap()
            try:
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise ReplyTooLarge(str(request.url), limit)
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise ReplyTooLarge(str(request.url), limit)
                    chunks.append(chunk)
            except ReplyTooLarge as exc:
                raise http.ReadError(str(exc), request=request) from exc
            finally:
                await response.aclose()
            headers = [(k, v) for k, v in response.headers.multi_items() if k not in _DECODED_AWAY]
            return http.Response(
                response.status_code, headers=headers, content=b"".join(chunks), request=request,
                extensions=response.extensions, history=response.history,
            )  # fmt: skip

    return BoundedAsyncClient


#: Headers that described the body as it came over the wire, not the decoded body handed on.
_DECODED_AWAY = frozenset({"content-encoding", "content-length", "transfer-encoding"})
