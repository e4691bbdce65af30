"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests of the project's OpenAI clients.

Why a real HTTP server rather than a mocked client: the teacher (``freelm synth``)
and the LLM judge rely on the ``openai`` client's own retry, backoff and response
parsing, and only real HTTP exercises them. Replies come from a FIFO queue of
scripted items first, then from a responder function of the request body, so
concurrent clients can be answered by content (which order they arrive in is
not deterministic) while a test can still force "the next call fails with 429".

Endpoints: ``POST /v1/chat/completions`` (non-streaming), ``GET /v1/models`` and a
text-only ``POST /v1/completions`` shaped like llama-cpp-python's server (0.3.36):
its schema types ``prompt`` as ``Union[str, List[str]]`` (``llama_cpp/server/types.py:
CreateCompletionRequest``), so a token-id array fails validation, and the error
handler answers every such exception with HTTP 500 and the whole pydantic message
(``llama_cpp/server/errors.py: RouteErrorHandler``); any model name is accepted and
the response names the server's own model (``llama_cpp/llama.py: create_completion``).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from freelm.testing.http_server import LocalHTTPServer, QuietHandler


@dataclass(frozen=True)
class ChatFault:
    """One scripted misbehaviour: an HTTP error (429, 5xx, ...) or, with ``status=200``, a malformed body.

    ``body`` is sent verbatim (:func:`chat_completion` builds a well-formed one to
    break or drip); ``None`` sends an OpenAI-style error object.
    ``retry_after_ms`` sets the header the openai client honours, so retry tests
    do not sleep through its default backoff. ``content_type`` is the header sent
    (a proxy's error page is ``text/html``). ``drip_s`` > 0 sends the body one
    byte at a time with that pause between bytes (every read returns promptly,
    so a per-read timeout never fires). ``endless`` sends ``body`` and then
    spaces without end (no length, 64 KiB a write, until the client hangs up):
    a server whose reply never ends.
    """

    status: int = 500
    body: str | None = None
    retry_after_ms: int | None = 1
    content_type: str = "application/json"
    drip_s: float = 0.0
    endless: bool = False


#: ``_send``'s pause between bytes that means "never stop sending" (``ChatFault.endless``).
ENDLESS = -1.0

Reply = str | ChatFault
Responder = Callable[[dict[str, Any]], Reply]


def count_words(text: str) -> int:
    """The server's stand-in token count (no tokenizer): whitespace-separated words."""
    return len(text.split())


def chat_completion(content: str | None, *, model: str = "teacher", prompt_words: int = 0) -> dict[str, Any]:
    """A well-formed ``chat.completion`` object whose assistant message is ``content``."""
    completion_words = count_words(content or "")
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": completion_words,
            "total_tokens": prompt_words + completion_words,
        },
    }


class OpenAIChatTestServer(LocalHTTPServer):
    """``with OpenAIChatTestServer(responder) as srv: AsyncOpenAI(base_url=srv.base_url, ...)``.

    ``responder`` is a fixed reply or a function of the request body (a ``str``
    is the assistant message content, a :class:`ChatFault` a failure).
    Counters for assertions: ``bodies`` (every chat request body, in arrival
    order), ``statuses`` (Counter of answered HTTP statuses), ``completions``
    (well-formed completions sent) and ``malformed`` (scripted bad 200 bodies sent).
    """

    def __init__(self, responder: Responder | str = "[]", *, model: str = "teacher", delay_s: float = 0.0):
        self.responder: Responder = responder if callable(responder) else (lambda _body, text=responder: text)
        self.model = model
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self.bodies: list[dict[str, Any]] = []
        self.statuses: Counter[int] = Counter()
        self.completions = 0
        self.malformed = 0

    @property
    def base_url(self) -> str:
        """The ``base_url`` an OpenAI client takes (ends in ``/v1``)."""
        return f"{self.origin}/v1"

    # ----- scripting ------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies`` in order, before the responder is asked again."""
        with self._lock:
            self._queue.extend(replies)

    # ----- request handling (handler threads) -----------------------------

    def chat(self, body: Any) -> tuple[int, str, dict[str, str], float]:
        """Status, body text, extra headers and the pause between body bytes for one ``/v1/chat/completions``."""
        error = _validate_chat(body, self.model)
        if error is not None:
            return error[0], _error_body(error[1], "invalid_request_error"), {}, 0.0
        with self._lock:
            self.bodies.append(body)
            queued = self._queue.popleft() if self._queue else None
        if self.delay_s:
            time.sleep(self.delay_s)
        reply = queued if queued is not None else self.responder(body)
        if isinstance(reply, ChatFault):
            headers = {"Content-Type": reply.content_type}
            if reply.retry_after_ms is not None:
                headers["retry-after-ms"] = str(reply.retry_after_ms)
            if reply.status == 200:
                with self._lock:
                    self.malformed += 1
            text = reply.body if reply.body is not None else _error_body(f"scripted error {reply.status}", "server")
            return reply.status, text, headers, (ENDLESS if reply.endless else reply.drip_s)
        prompt_words = sum(count_words(str(m.get("content") or "")) for m in body["messages"])
        completion = chat_completion(reply, model=self.model, prompt_words=prompt_words)
        with self._lock:
            self.completions += 1
        return 200, json.dumps(completion), {}, 0.0

    def completion(self, body: Any) -> tuple[int, str, dict[str, str]]:
        """Status, body text and headers for one text-only ``/v1/completions`` request (see the module docstring)."""
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            message = (
                "2 validation errors for CreateCompletionRequest\nprompt.str\n  Input should be a valid string "
                f"[type=string_type, input_value={prompt!r}, input_type={type(prompt).__name__}]\n" * 40
            )  # the real message repeats the input per union member: kilobytes
            return 500, _error_body(message, "internal_server_error"), {}
        with self._lock:
            self.bodies.append(body)
        reply = self.responder(body)
        if isinstance(reply, ChatFault):
            return reply.status, reply.body or _error_body(f"scripted error {reply.status}", "server"), {}
        limit = int(body.get("max_tokens") or 16)
        words = reply.split()
        text = " ".join(words[:limit])
        completion = {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "text": text, "finish_reason": "length" if len(words) > limit else "stop"}],
            "usage": {
                "prompt_tokens": count_words(prompt),
                "completion_tokens": count_words(text),
                "total_tokens": count_words(prompt) + count_words(text),
            },
        }
        with self._lock:
            self.completions += 1
        return 200, json.dumps(completion), {}

    def models(self) -> str:
        return json.dumps({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "test"}]})

    def record_status(self, status: int) -> None:
        with self._lock:
            self.statuses[status] += 1


def _validate_chat(body: Any, model: str) -> tuple[int, str] | None:
    if not isinstance(body, dict):
        return 400, "request body must be a JSON object"
    if body.get("stream"):
        return 400, "stream=true is not supported by this test server"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return 400, "'messages' must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return 400, f"messages[{i}] needs a string 'role'"
    if body.get("model") != model:
        return 404, f"The model {body.get('model')!r} does not exist (served: {model!r})"
    return None


def _error_body(message: str, kind: str) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


class _Handler(QuietHandler):
    server_state: OpenAIChatTestServer

    def _send(self, status: int, text: str, headers: dict[str, str] | None = None, drip_s: float = 0.0) -> None:
        """``drip_s``: seconds between bytes; :data:`ENDLESS`: the body never ends (read until the connection closes)."""
        data = text.encode("utf-8", "surrogatepass")  # a scripted body may carry a lone surrogate: sent as is
        headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        if drip_s == ENDLESS:
            self.send_header("Connection", "close")  # no length: the body is whatever comes until the close
        else:
            self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.server_state.record_status(status)
        try:
            if drip_s == ENDLESS:
                self.wfile.write(data)
                filler = b" " * (64 << 10)
                while True:
                    self.wfile.write(filler)
            elif not drip_s:
                self.wfile.write(data)
            else:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(drip_s)
        except OSError:  # the client gave up on the reply
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, self.server_state.models())
        else:
            self._send(404, _error_body(f"no route {self.path}", "not_found"))

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        route = self.path.rstrip("/")
        if route not in ("/v1/chat/completions", "/v1/completions"):
            self._send(404, _error_body(f"no route {self.path}", "not_found"))
            return
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            self._send(400, _error_body("request body is not JSON", "invalid_request_error"))
            return
        state = self.server_state
        if route == "/v1/chat/completions":
            self._send(*state.chat(body))
        else:
            self._send(*state.completion(body))


OpenAIChatTestServer.handler_class = _Handler
