"""Scripted misbehaviour of the SGLang-protocol stand-in (:mod:`freelm.testing.sglang_server`).

A test queues faults (``fail_next``, ``drop_next``, ``delay_next``,
``abort_next``) and adapter-output overrides; each generation request
(``/generate`` or ``/v1/completions``) consumes at most one. What a fault looks
like on the wire is SGLang's: an error status in the body SGLang uses for it, an
abort as the scheduler reports it (``managers/schedule_batch.py: FINISH_ABORT``,
``managers/tokenizer_manager.py: _handle_abort_finish_reason``).
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
    ``status`` (``None``: a 200 whose ``finish_reason`` is ``abort``).
    """

    kind: Literal["status", "drop", "delay", "abort"]
    status: int | None = 503
    message: str = "scripted server error"
    seconds: float = 0.0

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
        """The next transport-level fault (status, drop, delay); an ``abort`` waits for its request to be parsed."""
        return self._pop(lambda kind: kind != "abort")

    def next_abort(self) -> Fault | None:
        """The next fault if it is an ``abort`` (the request was parsed and reached the scheduler)."""
        return self._pop(lambda kind: kind == "abort")

    def next_override(self) -> str | None:
        with self._lock:
            return self._overrides.popleft() if self._overrides else None

    def _pop(self, wanted: Callable[[str], bool]) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults and wanted(self._faults[0].kind) else None


def override_result(result: GenerateResult, text: str, engine: Engine) -> GenerateResult:
    """The scripted adapter answer replaces the engine's (ids from the engine's own tokenizer, no eos)."""
    ids = engine.encode(text)
    return GenerateResult(
        text=text, output_ids=ids, finish_reason="stop", prompt_tokens=result.prompt_tokens, completion_tokens=len(ids)
    )
