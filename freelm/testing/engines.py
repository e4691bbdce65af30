"""Model engines behind the SGLang-protocol stand-in (:mod:`freelm.testing.sglang_server`).

The server applies SGLang's rules; the engine only turns a scheduled request
into tokens. :class:`Engine` is what the server needs; :class:`ScriptedEngine`
answers scripted text with no model (fixed delay, byte-level ids), and
:class:`ScriptedTokenizer` lets the loop speak exactly those ids. The other
engines are :class:`freelm.backends.local.LocalBackend` (the tiny model) and
:class:`freelm.testing.counting.CountingEngine` (a no-torch counting model).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

from freelm.backends.base import BackendError, GenerateRequest, GenerateResult


class Engine(Protocol):
    """What the server needs from a model. ``generate_blocking`` may block; it is called from handler threads.

    ``text`` in the result is the untrimmed decoding with special tokens kept;
    the server applies ``no_stop_trim`` / ``skip_special_tokens`` itself via ``decode``.
    Bad requests raise :class:`BackendError` (-> HTTP 400).
    """

    adapter_names: list[str]

    def generate_blocking(self, request: GenerateRequest) -> GenerateResult: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def load_adapter(self, name: str, path: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def flush_cache(self) -> None: ...


Script = str | Callable[[GenerateRequest], str]


class ScriptedEngine:
    """A model-free engine: every call sleeps ``delay`` seconds and answers the scripted text for its adapter.

    ``outputs`` maps an adapter name (``None`` = base model) to a string or to a
    function of the request. Token ids are UTF-8 bytes + ``ID_OFFSET`` (a
    stand-in tokenizer, so ``output_ids`` decode back to ``text``), id ``EOS_ID``
    ends every answer that fits in ``max_new_tokens``. A ``stop`` string in the
    scripted text ends the answer right after it. ``cached_tokens`` comes from
    the server's radix cache, not from the engine.
    """

    EOS_ID = 1
    ID_OFFSET = 2
    EOS_TEXT = "<|im_end|>"

    def __init__(self, outputs: dict[str | None, Script] | None = None, *, delay: float = 0.0):
        self.outputs: dict[str | None, Script] = dict(outputs or {None: "Let me think. \\boxed{0}"})
        self.delay = delay
        self._lock = threading.Lock()
        self._loaded = [name for name in self.outputs if name is not None]

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self._loaded)

    def encode(self, text: str) -> list[int]:
        return [b + self.ID_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        parts, buf = [], bytearray()
        for i in ids:
            if i == self.EOS_ID:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special_tokens:
                    parts.append(self.EOS_TEXT)
            else:
                buf.append((i - self.ID_OFFSET) % 256)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def load_adapter(self, name: str, path: str) -> None:
        with self._lock:
            if name in self._loaded:
                raise BackendError(f"Failed to load LoRA adapter {name} because it is already loaded")
            self._loaded.append(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self._loaded:
                self._loaded.remove(name)

    def flush_cache(self) -> None:
        return None

    def generate_blocking(self, request: GenerateRequest) -> GenerateResult:
        script = self.outputs.get(request.adapter, self.outputs.get(None, ""))
        answer = script(request) if callable(script) else script
        prompt = list(request.input_ids) if request.input_ids is not None else self.encode(request.text or "")
        if self.delay:  # sleep(0) still yields the CPU: on a busy machine that is milliseconds per request
            time.sleep(self.delay)
        cuts = [answer.find(s) + len(s) for s in request.stop if s and s in answer]
        # a stop string ends the answer right after it (no eos), as a real engine would stop there
        ids = self.encode(answer[: min(cuts)]) if cuts else self.encode(answer) + [self.EOS_ID]
        finish: Literal["stop", "length"] = "stop"
        if len(ids) > request.max_new_tokens:
            ids, finish = ids[: request.max_new_tokens], "length"
        return GenerateResult(
            text=self.decode(ids),
            output_ids=ids,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=len(ids),
        )


class ScriptedTokenizer:
    """The :class:`ScriptedEngine`'s ids behind the Hugging Face calls :class:`freelm.tokenizer.Tokenizer` makes.

    ``Tokenizer(ScriptedTokenizer())`` lets the loop send exactly the ids the
    scripted server speaks, with no model, no tokenizer files and no training.
    """

    chat_template = None
    eos_token_id = ScriptedEngine.EOS_ID

    def __init__(self) -> None:
        self._engine = ScriptedEngine()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._engine.encode(text)

    def decode(
        self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        return self._engine.decode(ids, skip_special_tokens=skip_special_tokens)
