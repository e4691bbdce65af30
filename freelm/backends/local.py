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
  is their decoding, stop string included;
* with ``max_batch > 1``, concurrent requests decode together in one running
  batch (:mod:`freelm.backends.local_batch`), admitted per adapter in waves
  (the default) or at every step with mixed adapters (``scheduling=
  "continuous"``, what SGLang's scheduler does). On a small model a batch of 16
  costs about as much per step as one sequence, so concurrent rollouts,
  synthesis and the demo run several times faster. Each row starts from its
  own cached prefix (the same LRU), so a rollout's context is prefilled once
  across calls and, after a deletion, only the changed suffix is;
* the cache is bounded: ``cache_size`` sequences per namespace and
  ``cache_bytes`` of KV in all (least recently stored evicted first), and a
  reasoning sequence that ended on eos (its rollout is over) is not kept.

torch, transformers and peft are imported lazily (``import freelm`` stays light).
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from freelm.backends import BackendArgs, BackendKind, register_backend
from freelm.backends.base import (
    BackendError,
    ContextWindow,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    ServerLimits,
)
from freelm.backends.local_batch import (
    DecodeStats,
    Row,
    RowAdapters,
    RunningBatch,
    StepStats,
    StopRule,
    check_adapter,
)
from freelm.backends.local_kv import (
    CachedSequence,
    PrefixCache,
    Taken,
    entry_bytes,
    eviction_refusal,
    rope_frequencies,
    with_cache,
)
from freelm.tokenizer import Tokenizer

#: How generate() admits waiting requests into the running batch (see LocalBackend._admit). "waves" is the
#: default because it measured faster on the embedded model (docs/runner.md): there a mixed step's LoRA work
#: costs more than the forwards continuous batching saves.
SCHEDULING = ("waves", "continuous")
#: Event-loop turns between steps: a rollout's next request (through the pool, the loop, the cleaner) takes
#: more than one turn to be sent; on the demo 4 turns saved 3% of the decode steps over 1, 16 nothing more.
_JOIN_YIELDS = 4


class LocalBackend:
    """A transformers causal LM (optionally a ``PeftModel``) behind the Backend protocol.

    Model calls are serialised by a lock and run in a worker thread. With
    ``max_batch`` 1 concurrent rollouts interleave request by request; above 1,
    :meth:`generate` feeds a running batch stepped in the worker thread
    (:meth:`_schedule`, ``scheduling`` decides who joins when).
    :meth:`generate_blocking` serves the threaded SGLang test server;
    :meth:`generate_batch_blocking` decodes a given list together, for offline
    callers and for checking batched outputs against one-by-one outputs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        *,
        eos_token_ids: list[int] | None = None,
        cache_size: int | None = None,
        name: str = "local",
        model_path: str = "",
        max_batch: int = 1,
        cache_bytes: int = 1 << 30,
        scheduling: str = "waves",
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        eos = frozenset(eos_token_ids if eos_token_ids is not None else tokenizer.eos_token_ids)
        if not eos:
            raise ValueError("LocalBackend needs at least one eos token id (none in tokenizer or generation_config)")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        #: Generation stops with "length" here (prompt + output never exceed the model's positions).
        context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        self.stop_rule = StopRule(eos, context_length, tokenizer)
        #: sequences kept per namespace: by default two per batch row (a rollout's live one and a stale one)
        self.prefix_cache = PrefixCache(
            model.config,
            size=cache_size if cache_size is not None else max(4, 2 * max_batch),
            max_bytes=cache_bytes,
            inv_freq=rope_frequencies(model),
        )
        #: bytes of one token's KV over all layers (what the peak KV counters are multiplied by)
        self.kv_entry_bytes = entry_bytes(model)
        self.max_batch = max_batch
        if scheduling not in SCHEDULING:
            raise ValueError(f"scheduling must be one of {SCHEDULING}, got {scheduling!r}")
        #: how :meth:`generate` admits waiting requests into the running batch (see :meth:`_admit`)
        self.scheduling = scheduling
        self.stats: dict[str | None, DecodeStats] = {}
        self.step_stats = StepStats()
        self.row_adapters = RowAdapters()
        self.row_adapters.attach(self.model)
        self.name = name
        self.model_path = model_path
        self._lock = threading.Lock()
        self._waiting: list[tuple[GenerateRequest, asyncio.Future, float]] = []
        self._scheduler: asyncio.Task | None = None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.stop_rule.eos_token_ids

    @property
    def context_length(self) -> int | None:
        """The model's ``max_position_embeddings``: prompt + output stop there (``length``)."""
        return self.stop_rule.context_length

    @property
    def cache_size(self) -> int:
        """Sequences the prefix cache keeps per namespace."""
        return self.prefix_cache.size

    @cache_size.setter
    def cache_size(self, value: int) -> None:
        self.prefix_cache.size = value

    @property
    def cache_bytes(self) -> int:
        """KV bytes the prefix cache keeps over all namespaces."""
        return self.prefix_cache.max_bytes

    @cache_bytes.setter
    def cache_bytes(self, value: int) -> None:
        self.prefix_cache.max_bytes = value

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        adapters: dict[str, str | Path] | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        threads: int | None = None,
        cache_size: int | None = None,
        max_batch: int = 1,
        cache_bytes: int = 1 << 30,
    ) -> LocalBackend:
        """Load an HF checkpoint directory and PEFT adapter directories (``{"free": dir}``) from disk."""
        import torch
        from transformers import AutoModelForCausalLM

        if threads is not None:
            torch.set_num_threads(threads)
        model_dir = Path(model_dir)
        torch_dtype = getattr(torch, dtype) if dtype else None
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype).to(device)
        backend = cls(
            model,
            Tokenizer.from_pretrained(model_dir),
            cache_size=cache_size,
            model_path=str(model_dir),
            max_batch=max_batch,
            cache_bytes=cache_bytes,
        )
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
                with warnings.catch_warnings():
                    # peft 0.21 reads model.is_gradient_checkpointing (peft_model.py, PeftModel.__init__), which
                    # transformers 5.2x deprecated: peft's call, not ours, and meaningless for inference
                    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name).eval()
            self.row_adapters.attach(self.model)
            self.prefix_cache.drop(name)  # like SGLang's fresh uuid per load: no stale KV hit

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self.adapter_names:
                raise BackendError(f"adapter {name!r} is not loaded (loaded: {self.adapter_names})")
            self.model.delete_adapter(name)
            self.prefix_cache.drop(name)

    def flush_cache(self) -> None:
        with self._lock:
            self.prefix_cache.clear()

    # ----- generation -----------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self.max_batch == 1:
            return await asyncio.to_thread(self.generate_blocking, request)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future, time.perf_counter()))
        if self._scheduler is None or self._scheduler.done():
            self._scheduler = asyncio.create_task(self._schedule())
        return await future

    async def _schedule(self) -> None:
        """Run the batch step by step until nobody waits or decodes; each step admits waiting requests first."""
        batch = RunningBatch(self)
        while self._waiting or batch.members:
            for _ in range(_JOIN_YIELDS):  # rollouts that are about to send a request join this step
                await asyncio.sleep(0)
            for row in batch.members:
                if row.ticket.done():  # the caller was cancelled: the row leaves at this step
                    row.finish = row.finish or "abort"
            joiners = self._admit(batch)
            try:
                finished = await asyncio.to_thread(self._step_locked, batch, joiners)
            except Exception as exc:  # noqa: BLE001 - handed to every caller in the batch, never lost
                finished = batch.fail(exc)
                failed = {id(row) for row in finished}
                finished += [row for row in joiners if id(row) not in failed]
                for row in finished:
                    row.outcome = exc
            for row in finished:
                if row.ticket.done():
                    continue
                if row.outcome is None:
                    try:
                        row.outcome = self._row_result(row, row.started)
                    except Exception as exc:  # noqa: BLE001 - this caller's error: the scheduler must go on
                        row.outcome = exc
                if isinstance(row.outcome, BaseException):
                    row.ticket.set_exception(row.outcome)
                else:
                    row.ticket.set_result(row.outcome)

    def _admit(self, batch: RunningBatch) -> list[Row]:
        """Waiting requests that join the batch now (``scheduling``); a bad one fails at once, alone.

        ``waves`` (the default): only into an empty batch, the oldest
        request's adapter with every waiting request that shares it; rows
        still leave as they finish. ``continuous``: any waiting request, any
        adapter, at every step while there is room, as SGLang's scheduler does.
        """
        room = max(0, self.max_batch - len(batch.members))  # max_batch may be lowered while a batch runs
        if self.scheduling == "waves":
            if batch.members or not self._waiting:
                return []
            adapter = self._waiting[0][0].adapter
            chosen = [item for item in self._waiting if item[0].adapter == adapter][:room]
        else:
            chosen = self._waiting[:room]
        taken = {id(future) for _, future, _ in chosen}  # by identity: equal requests are still different calls
        self._waiting = [item for item in self._waiting if id(item[1]) not in taken]
        joiners = []
        for request, future, started in chosen:
            if future.done():  # cancelled while waiting
                continue
            try:
                joiners.append(self._row(request, started, future))
            except Exception as exc:  # noqa: BLE001 - e.g. top_p < 0: fails this caller, not the scheduler
                future.set_exception(_request_error(exc))
        return joiners

    def _step_locked(self, batch: RunningBatch, joiners: list[Row]) -> list[Row]:
        import torch

        with self._lock, torch.inference_mode():
            return batch.step(joiners)

    def _row(self, request: GenerateRequest, started: float, ticket: Any) -> Row:
        """A request ready to join a batch (its prompt checked, its adapter loaded, its sampler seeded)."""
        ids = self._prompt_ids(request)
        check_adapter(request.adapter, self.adapter_names)
        return Row(request, ids, _token_picker(request.sampling, request.seed, self.model.device), started, ticket)

    def namespace_stats(self, namespace: str | None) -> DecodeStats:
        return self.stats.setdefault(namespace, DecodeStats())

    async def server_limits(self) -> ServerLimits:
        """The model's window (input < ``max_position_embeddings``, stops at it); seeds are always honoured."""
        if not self.context_length:
            return ServerLimits(seeds_honoured=True, source=self.name)
        length = self.context_length
        window = ContextWindow(length - 1, length, source=f"{self.name} max_position_embeddings")
        return ServerLimits(window=window, seeds_honoured=True, source=self.name)

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
        ids = self._prompt_ids(request)
        with self._lock, torch.inference_mode(), self._adapter_context(request.adapter):
            taken = self.prefix_cache.take(request.adapter, ids, request.eviction)
            self.namespace_stats(request.adapter).cached_tokens += taken.reused
            output_ids, finish = self._decode_loop(ids, taken, request)
            self.step_stats.held_kv(taken.cache.get_seq_length(), self.prefix_cache.entries)
            if not self.stop_rule.ends_rollout(request.adapter, output_ids):
                sequence = CachedSequence.finished(
                    ids, output_ids, taken.cache, taken.positions, taken.next_position, taken.exact
                )
                self.prefix_cache.keep(request.adapter, sequence)
        return self._result(ids, output_ids, finish, taken.reused, start, taken.evicted, taken.rerotated)

    def generate_batch_blocking(self, requests: list[GenerateRequest]) -> list[GenerateResult | BackendError]:
        """Decode requests together, any mix of adapters; a bad request is returned as its error, not raised.

        All rows join at the first step and leave as they finish (the batch
        engine of :meth:`generate`, :mod:`freelm.backends.local_batch`). Each row
        starts from its longest cached prefix, as a lone request does. Greedy
        outputs equal the one-by-one outputs up to floating-point ties (the
        padded batch sums in a different order); the tests check equality on
        the embedded default's model.
        """
        import torch

        start = time.perf_counter()
        outcomes: list[Any] = [None] * len(requests)
        joiners = []
        for i, request in enumerate(requests):
            try:
                joiners.append(self._row(request, start, i))
            except Exception as exc:  # noqa: BLE001 - a bad request is returned as its error, not raised
                outcomes[i] = _request_error(exc)
        batch = RunningBatch(self)
        try:
            with self._lock, torch.inference_mode():
                while joiners or batch.members:
                    for row in batch.step(joiners):
                        outcomes[row.ticket] = self._row_result(row, start)
                    joiners = []
        except BackendError as exc:
            return [exc] * len(requests)
        return outcomes

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        ids = list(request.input_ids) if request.input_ids is not None else self.tokenizer.encode(request.text or "")
        if not ids:
            raise BackendError("empty prompt: nothing to condition on")
        if self.context_length and len(ids) >= self.context_length:
            raise BackendError(
                f"the input ({len(ids)} tokens) is not shorter than the context length ({self.context_length})"
            )
        if request.eviction is not None:
            refusal = eviction_refusal(self.model, request.eviction.strategy, self.prefix_cache.inv_freq)
            if refusal:
                raise BackendError(refusal)
        return ids

    def _result(
        self,
        ids: list[int],
        output_ids: list[int],
        finish: str,
        reused: int,
        start: float,
        evicted: int = 0,
        rerotated: int = 0,
    ) -> GenerateResult:
        return GenerateResult(
            text=self.tokenizer.decode(output_ids),
            output_ids=output_ids,
            finish_reason=finish,  # type: ignore[arg-type]
            prompt_tokens=len(ids),
            completion_tokens=len(output_ids),
            cached_tokens=reused,
            latency_s=time.perf_counter() - start,
            endpoint=self.name,
            evicted_tokens=evicted,
            rerotated_tokens=rerotated,
        )

    def _row_result(self, row: Row, start: float) -> GenerateResult:
        return self._result(row.prompt, row.output, row.finish, row.reused, start, row.evicted, row.rerotated)

    def _adapter_context(self, adapter: str | None):
        """Base model = adapters disabled; a name = that adapter active. Unknown names fail like SGLang."""
        from contextlib import nullcontext

        names = self.adapter_names
        if adapter is None:
            return self.model.disable_adapter() if names else nullcontext()
        check_adapter(adapter, names)
        self.model.set_adapter(adapter)
        return nullcontext()

    def _forward(self, stats: DecodeStats, prefill_tokens: int, **inputs: Any) -> Any:
        """One model step, its time booked as prefill (``prefill_tokens`` > 0) or as one decoded token per row."""
        started = time.perf_counter()
        logits = self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        elapsed = time.perf_counter() - started
        if prefill_tokens:
            stats.prefill_s += elapsed
            stats.prefill_tokens += prefill_tokens
        else:
            stats.decode_s += elapsed
            stats.decode_tokens += len(logits)
            stats.decode_steps += 1
        return logits

    def _decode_loop(self, ids: list[int], taken: Taken, request: GenerateRequest) -> tuple[list[int], str]:
        import torch

        stats = self.namespace_stats(request.adapter)
        pick = _token_picker(request.sampling, request.seed, self.model.device) or _argmax
        device = self.model.device
        feed, positions = ids[taken.reused :], taken.positions[taken.reused :]
        prefill = len(feed)
        output: list[int] = []
        while True:
            logits = self._forward(
                stats, prefill,
                input_ids=torch.tensor([feed], device=device), position_ids=torch.tensor([positions], device=device),
                **with_cache(taken.cache),
            )[0]  # fmt: skip
            prefill = 0
            output.append(pick(logits))
            finish = self.stop_rule.reason(len(ids), output, request)
            if finish:
                return output, finish
            feed, positions = [output[-1]], [taken.next_position + len(output) - 1]


def _request_error(exc: Exception) -> BackendError:
    """A request the batch cannot take, as the do-not-retry error its caller gets (a bad sampler setting included)."""
    return exc if isinstance(exc, BackendError) else BackendError(f"bad request: {type(exc).__name__}: {exc}")


def _argmax(logits: Any) -> int:
    return int(logits.argmax())


def _token_picker(sampling: SamplingParams, seed: int | None, device: Any):
    """A function logits -> next token id (HF's warpers + a seeded generator), or None at temperature 0: argmax."""
    import torch

    if sampling.temperature <= 0:
        return None
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


def _runner_options(args: BackendArgs) -> dict[str, Any]:
    # concurrent rollouts' requests are decoded together, like a server's scheduler would
    return {"model_dir": args.model_dir, "max_batch": args.concurrency, "adapters": dict(args.adapters) or None}


register_backend(
    BackendKind(
        "local", LocalBackend.from_pretrained, remote=False, options=_runner_options,
        help="in-process transformers + peft", order=2, evicts=True,
    )
)  # fmt: skip
