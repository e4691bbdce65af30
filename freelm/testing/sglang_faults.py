"""Scripted misbehaviour of the SGLang-protocol stand-in (:mod:`freelm.testing.sglang_server`).

A test queues faults (``fail_next``, ``drop_next``, ``delay_next``,
``abort_next``, ``endless_body_next``, ``drip_next``, ``overlong_next``) and
adapter-output overrides; each generation request (``/generate`` or
``/v1/completions``) consumes at most one. What a fault looks like on the wire
is SGLang's where SGLang has it: an error status in the body SGLang uses for
it, an abort as the scheduler reports it (``managers/schedule_batch.py:
FINISH_ABORT``, ``managers/tokenizer_manager.py: _handle_abort_finish_reason``).
The others are what a broken server or a hostile one in front of it sends, and
no SGLang source file describes: a 200 whose body never ends
(``endless_body``), a reply sent a byte at a time (``drip``), a well-formed
reply with more output tokens than were asked for (``overlong``).
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from freelm.backends.base import GenerateResult
from freelm.testing.engines import Engine
from freelm.testing.sglang_protocol import Refusal


@dataclass
class Fault:
    """One scripted misbehaviour, consumed by the next generation request (``/generate`` or ``/v1/completions``).

    ``status``: answer HTTP ``status`` with ``message`` in SGLang's body for that
    status; ``drop``: close the socket without answering; ``delay``: sleep
    ``seconds`` first, then answer normally (past a short client timeout);
    ``abort``: the scheduler aborts the request with ``message`` and
    ``status`` (``None``: a 200 whose ``finish_reason`` is ``abort``);
    ``endless_body``: a 200 whose JSON body never ends (no ``Content-Length``;
    bytes until the client hangs up); ``drip``: the normal answer, one byte
    every ``seconds``; ``overlong``: a well-formed 200 with ``tokens`` output
    ids, whatever ``max_new_tokens`` was.
    """

    kind: Literal["status", "drop", "delay", "abort", "endless_body", "drip", "overlong"]
    status: int | None = 503
    message: str = "scripted server error"
    seconds: float = 0.0
    tokens: int = 0

    @property
    def on_reply(self) -> bool:
        """Whether the fault shapes the answer (consumed once the request is parsed), not the transport."""
        return self.kind in ("abort", "overlong")

    def status_refusal(self) -> Refusal:
        """A ``status`` fault's answer: 5xx (or no status) as an HTTPException, 4xx as a ValueError.

        The bodies are :class:`Refusal`'s (``entrypoints/http_server.py``: ``validation_exception_handler``,
        ``_create_error_response``).
        """
        status = self.status or 500
        return Refusal(status, self.message, "http" if status >= 500 else "value")

    def abort_refusal(self) -> Refusal | None:
        """An ``abort`` with a status: 400 -> a ValueError, 5xx -> an HTTPException; ``None`` without one.

        ``managers/tokenizer_manager.py: _handle_abort_finish_reason``.
        """
        if self.status is None:
            return None
        return Refusal(self.status, self.message, kind="value" if self.status == 400 else "http")

    def abort_meta(self) -> dict:
        """``managers/schedule_batch.py: FINISH_ABORT.to_json`` for an abort without an HTTP status."""
        return {
            "id": uuid.uuid4().hex,
            "finish_reason": {"type": "abort", "message": self.message, "status_code": None, "err_type": None},
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
        }


class FaultQueue:
    """The faults and adapter-output overrides a test queued, consumed in order from handler threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: deque[Fault] = deque()
        self._overrides: deque[str] = deque()

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self._overrides.clear()

    def add(self, fault: Fault, times: int) -> None:
        with self._lock:
            self._faults.extend([fault] * times)

    def add_override(self, text: str, times: int) -> None:
        with self._lock:
            self._overrides.extend([text] * times)

    def next_transport(self) -> Fault | None:
        """The next transport-level fault; one that shapes the answer waits for its request to be parsed."""
        return self._pop(lambda fault: not fault.on_reply)

    def next_reply(self) -> Fault | None:
        """The next fault if it shapes the answer (``abort``, ``overlong``): the request reached the scheduler."""
        return self._pop(lambda fault: fault.on_reply)

    def next_override(self) -> str | None:
        with self._lock:
            return self._overrides.popleft() if self._overrides else None

    def _pop(self, wanted: Callable[[Fault], bool]) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults and wanted(self._faults[0]) else None


def override_result(result: GenerateResult, text: str, engine: Engine, max_new_tokens: int) -> GenerateResult:
    """The scripted adapter answer replaces the engine's (ids from the engine's own tokenizer, no eos).

    Like any engine's, it ends at ``max_new_tokens`` (finished by ``length``): a reply with more
    tokens than asked is the ``overlong`` fault, not an override.
    """
    ids = engine.encode(text)
    finish = "stop"
    if len(ids) > max_new_tokens:
        ids, finish = ids[:max_new_tokens], "length"
        text = engine.decode(ids, skip_special_tokens=False)
    return GenerateResult(
        text=text, output_ids=ids, finish_reason=finish, prompt_tokens=result.prompt_tokens, completion_tokens=len(ids)
    )


def overlong_result(result: GenerateResult, tokens: int, engine: Engine) -> GenerateResult:
    """A reply of ``tokens`` output ids (one token repeated) in place of the engine's: finished by ``length``."""
    ids = (engine.encode(" 1") or [0])[:1] * tokens
    text = engine.decode(ids, skip_special_tokens=False)
    return GenerateResult(
        text=text, output_ids=ids, finish_reason="length", prompt_tokens=result.prompt_tokens, completion_tokens=tokens
    )
