"""In-process generation with transformers + peft: the embedded default's engine and the test server's model.

It behaves like a one-GPU SGLang server with ``--lora-paths free=...``:

* adapter ``None`` runs the base model under peft's ``disable_adapter()``
  (reasoning mode); a name runs that LoRA (cleaning mode);
* a small LRU of recent sequences' KV caches per adapter namespace plays the
  radix cache: a request reuses the longest common token prefix with any cached
  sequence of the SAME namespace (base and adapter KV differ, so they never
  share), and ``cached_tokens`` reports the reused length;
* output semantics match ``SGLangBackend`` (``skip_special_tokens=false``,
  ``no_stop_trim=true``): ``output_ids`` include a final eos token and ``text``
  is their decoding, stop string included.

torch, transformers and peft are imported lazily (``import freelm`` stays light).
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freelm.backends.base import BackendError, GenerateRequest, GenerateResult, SamplingParams
from freelm.tokenizer import Tokenizer


@dataclass
class _CachedSequence:
    """KV for exactly ``ids`` (prompt + output minus the last sampled token, which was never fed)."""

    ids: list[int]
    cache: Any  # transformers DynamicCache



class LocalBackend:
    """A transformers causal LM (optionally a ``PeftModel``) behind the Backend protocol.

    Calls are serialised by a lock and run in a worker thread, so concurrent
    rollouts interleave request by request; the same blocking entry point
    (:meth:`generate_blocking`) serves the threaded SGLang test server.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        eos_token_ids: list[int] | None = None,
        cache_size: int = 4,
        name: str = "local",
        model_path: str = "",
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError("LocalBackend needs at least one eos token id (none in tokenizer or generation_config)")
        self.cache_size = cache_size
        self.name = name
        self.model_path = model_path
        #: Generation stops with "length" here (prompt + output never exceed the model's positions).
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()
        self._caches: dict[str | None, OrderedDict[int, _CachedSequence]] = {}
        self._next_key = 0

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        adapters: dict[str, str | Path] | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int | None = None,
        cache_size: int = 4,
    ) -> LocalBackend:
        """Load an HF checkpoint directory and PEFT adapter directories (``{"free": dir}``) from disk."""
        import torch
        from transformers import AutoModelForCausalLM

        if threads is not None:
            torch.set_num_threads(threads)
        model_dir = Path(model_dir)
        torch_dtype = getattr(torch, dtype) if dtype else None
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).to(device)
        backend = cls(model, Tokenizer.from_pretrained(model_dir), cache_size=cache_size, model_path=str(model_dir))
        for adapter_name, adapter_dir in (adapters or {}).items():
            backend.load_adapter(adapter_name, adapter_dir)
        return backend

    # ----- adapters -------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        peft_config = getattr(self.model, "peft_config", None)
        return sorted(peft_config) if isinstance(peft_config, dict) else []

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load a PEFT adapter directory under ``name`` (wrapping the model in a PeftModel the first time)."""
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise BackendError(f"adapter {name!r}: {path} has no adapter_config.json")
        with self._lock:
            if name in self.adapter_names:
                raise BackendError(f"adapter {name!r} is already loaded; unload it first")
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
            self._caches.pop(name, None)  # like SGLang's fresh uuid per load: no stale KV hit

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.adapter_names:
                raise BackendError(f"adapter {name!r} is not loaded (loaded: {self.adapter_names})")
            self.model.delete_adapter(name)
            self._caches.pop(name, None)

    def flush_cache(self) -> None:
        with self._lock:
            self._caches.clear()

    # ----- generation -----------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        return await asyncio.to_thread(self.generate_blocking, request)

    async def aclose(self) -> None:
        self.flush_cache()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            return self.tokenizer.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.tokenizer.decode(ids)

    def generate_blocking(self, request: GenerateRequest) -> GenerateResult:
        """Run one request to completion (thread-safe; blocks while another request runs)."""
        import torch

        start = time.perf_counter()
        ids = list(request.input_ids) if request.input_ids is not None else self.tokenizer.encode(request.text or "")
        if not ids:
            raise BackendError("empty prompt: nothing to condition on")
        if self.context_length and len(ids) >= self.context_length:
            raise BackendError(
                f"the input ({len(ids)} tokens) is not shorter than the context length ({self.context_length})"
            )
        with self._lock, torch.inference_mode(), self._adapter_context(request.adapter):
            entry, reused = self._take_cache(request.adapter, ids)
            output_ids, finish = self._decode_loop(ids, entry.cache, reused, request)
            entry.ids = ids + output_ids[:-1]
            if entry.cache.get_seq_length() == len(entry.ids):  # a cache out of step with its ids must never be reused
                self._store(request.adapter, entry)
        return GenerateResult(
            text=self.tokenizer.decode(output_ids),
            output_ids=output_ids,
            finish_reason=finish,
            prompt_tokens=len(ids),
            completion_tokens=len(output_ids),
            cached_tokens=reused,
            latency_s=time.perf_counter() - start,
            endpoint=self.name,
        )

    def _adapter_context(self, adapter: str | None):
        """Base model = adapters disabled; a name = that adapter active. Unknown names fail like SGLang."""
        from contextlib import nullcontext

        names = self.adapter_names
        if adapter is None:
            return self.model.disable_adapter() if names else nullcontext()
        if adapter not in names:
            raise BackendError(f"Got LoRA adapter that has never been loaded: {adapter!r} (loaded: {names})")
        self.model.set_adapter(adapter)
        return nullcontext()

    def _take_cache(self, namespace: str | None, ids: list[int]) -> tuple[_CachedSequence, int]:
        """The cached sequence sharing the longest prefix with ``ids``, cropped to it (or a fresh cache).

        At least the last prompt token is always recomputed (its logits start
        decoding), as in SGLang. A cache that is wholly a prefix of ``ids`` is
        taken over in place (the usual "reasoning continues" case); a partial
        match is copied first so the other sequence keeps its own tail.
        """
        from transformers import DynamicCache

        lru = self._caches.setdefault(namespace, OrderedDict())
        best_key, best = None, 0
        for key, seq in lru.items():
            n = min(len(os.path.commonprefix([seq.ids, ids])), len(ids) - 1)
            if n > best:
                best_key, best = key, n
        if best_key is None:
            return _CachedSequence(ids=[], cache=DynamicCache(config=self.model.config)), 0
        seq = lru[best_key]
        if best == len(seq.ids):
            del lru[best_key]
            cache = seq.cache
        else:
            cache = copy.deepcopy(seq.cache)
            # a negative argument removes that many tokens from the end (the form every transformers version takes)
            cache.crop(-(len(seq.ids) - best))
        return _CachedSequence(ids=ids[:best], cache=cache), best

    def _store(self, namespace: str | None, entry: _CachedSequence) -> None:
        lru = self._caches.setdefault(namespace, OrderedDict())
        self._next_key += 1
        lru[self._next_key] = entry
        while len(lru) > self.cache_size:
            lru.popitem(last=False)

    def _decode_loop(self, ids: list[int], cache: Any, reused: int, request: GenerateRequest) -> tuple[list[int], str]:
        import torch

        pick = _token_picker(request.sampling, request.seed, self.model.device)
        stop_window = max((len(s.encode("utf-8")) for s in request.stop), default=0) + 1
        feed = ids[reused:]
        output: list[int] = []
        while True:
            logits = self.model(
                input_ids=torch.tensor([feed], device=self.model.device), past_key_values=cache, use_cache=True
            ).logits[0, -1]
            token = pick(logits)
            output.append(token)
            if token in self.eos_token_ids:
                return output, "stop"
            if request.stop and any(s in self.tokenizer.decode(output[-stop_window:]) for s in request.stop):
                return output, "stop"
            if len(output) >= request.max_new_tokens or (
                self.context_length and len(ids) + len(output) >= self.context_length
            ):
                return output, "length"
            feed = [token]


def _token_picker(sampling: SamplingParams, seed: int | None, device: Any):
    """A function logits -> next token id: argmax at temperature 0, else HF's warpers + a seeded generator."""
    import torch

    if sampling.temperature <= 0:
        return lambda logits: int(torch.argmax(logits))
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    if sampling.min_p > 0:
        warpers.append(MinPLogitsWarper(sampling.min_p))
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def pick(logits):
        scores = warpers(None, logits.float().unsqueeze(0))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator)[0, 0])

    return pick
