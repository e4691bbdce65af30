"""Step-level continuous batching for :class:`~freelm.backends.local.LocalBackend`, with mixed adapters per row.

What SGLang's scheduler does on a GPU, on a tiny model on a CPU: one batch of
running rows, each its own request (reasoning on the base model or cleaning on
any loaded LoRA), decoded together one token per step. Between steps, rows that
finished leave (their KV is stored in the engine's prefix cache) and waiting
requests join: the joiners' prompts are prefilled together in one forward, each
from its own longest cached prefix, and merged into the batch. So a rollout's
cleaning call decodes in the same forward steps as the other rollouts'
reasoning, instead of waiting for a wave of its adapter.

On a small model a forward costs nearly the same for 1 or 16 rows and its cost
is mostly per call, so what counts is the number of forwards: a batch that
always holds every rollout in flight needs about (tokens / rollouts) steps.

Mixed adapters use peft's mixed-batch forward (``adapter_names=[...]`` per row,
``"__base__"`` for the base model): a base row gets exactly the base layers'
output and an adapter row the base output plus its LoRA delta, as with
``disable_adapter()`` / ``set_adapter()``.

Layout (as in a left-padded batch): row r's KV is ``[pad..., r's tokens]`` along
the sequence and ``mask`` marks r's own columns; each row feeds its token at its
own position id (``Row.position``: its own token count, or under ``evict-gaps``
the position the prefix cache gave it), so each row computes what it would
alone. A merge left-pads the shorter side; leading columns that no row uses any
more are cut when rows leave.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from freelm.backends.base import BackendError, GenerateRequest, GenerateResult
from freelm.backends.local_kv import CachedSequence, PrefixCache, empty_cache, with_cache

if TYPE_CHECKING:
    from freelm.tokenizer import Tokenizer

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
#: A long joiner waits for its prefill until the steps waited reach this share of the running rows (see _admit):
#: 1 = break-even with the step the prefill forward costs them. On the demo 0.5-2 gave the same forward count
#: within 3% (1340-1376 forwards), 0 (prefill at once) 1420.
HOLD_SHARE = 1.0


@dataclass
class Row:
    """One request in the running batch: its prompt, what it has generated so far, and whom to tell."""

    request: GenerateRequest
    prompt: list[int]
    picker: Callable[[Any], int] | None  # None: greedy
    started: float
    ticket: Any = None  # the caller's handle (a future, or an index), untouched here
    reused: int = 0
    positions: list[int] = field(default_factory=list)  # the position of each prompt token (from the prefix cache)
    output_position: int = 0  # the position of the first output token
    exact: int | None = None  # its lead tokens whose KV a prefill computes alike (None: all; see local_kv.Taken)
    evicted: int = 0  # KV entries its prefix cache take evicted in place
    rerotated: int = 0  # kept entries re-rotated
    feed: int = 0  # the token the next decode step feeds: the last output (or, joining, the next prompt token)
    position: int = 0  # the position ``feed`` goes at
    pending: list[int] = field(default_factory=list)  # prompt tokens still to feed after ``feed`` (a joiner)
    held_steps: int = 0  # steps it waited for a prefill forward
    output: list[int] = field(default_factory=list)
    finish: str = ""
    outcome: GenerateResult | BaseException | None = None

    @property
    def namespace(self) -> str | None:
        return self.request.adapter


@dataclass
class DecodeStats:
    """Where the model's time went, per namespace (``None`` = base): prompt prefill vs token-by-token decoding.

    ``prefill_tokens`` counts tokens actually computed (a reused prefix is not);
    ``cached_tokens`` the prompt tokens served from the cache instead. In a
    batch shared by namespaces a forward's time is booked to each row's
    namespace by its share of the rows, and ``decode_steps`` counts the steps
    the namespace took part in.
    """

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0  # steps with a row of this namespace (decode_tokens / decode_steps: its mean rows)


@dataclass(frozen=True)
class StopRule:
    """When a request's decoding stops, and whether its KV is worth keeping afterwards."""

    eos_token_ids: frozenset[int]
    context_length: int | None  # prompt + output never reach it (the model's positions)
    tokenizer: Tokenizer  # stop strings are checked on the decoded tail

    def reason(self, prompt_len: int, output: list[int], request: GenerateRequest) -> str:
        """Why decoding stops after ``output``: ``stop`` (eos or a stop string), ``length``, or empty: go on."""
        if output[-1] in self.eos_token_ids:
            return "stop"
        if request.stop:
            window = max(len(s.encode("utf-8")) for s in request.stop) + 1
            if any(s in self.tokenizer.decode(output[-window:]) for s in request.stop):
                return "stop"
        if len(output) >= request.max_new_tokens or (
            self.context_length and prompt_len + len(output) >= self.context_length
        ):
            return "length"
        return ""

    def ends_rollout(self, namespace: str | None, output: list[int]) -> bool:
        """Reasoning that ended on eos: its rollout is over, so nothing will continue this sequence (not kept)."""
        return namespace is None and bool(output) and output[-1] in self.eos_token_ids


class BatchHost(Protocol):
    """What the running batch needs from its engine (:class:`~freelm.backends.local.LocalBackend`), and nothing more."""

    model: Any
    tokenizer: Tokenizer
    prefix_cache: PrefixCache
    stop_rule: StopRule
    row_adapters: RowAdapters
    step_stats: StepStats

    def namespace_stats(self, namespace: str | None) -> DecodeStats: ...


@dataclass
class StepStats:
    """The batch engine's own counters: forwards by kind, rows decoded and the time spent around the model."""

    decode_steps: int = 0
    prefill_forwards: int = 0
    joined_direct: int = 0  # requests that joined a decode step as they were (all but the last token cached)
    joined_prefilled: int = 0  # requests that joined through a prefill forward
    rows_decoded: int = 0  # / decode_steps = the mean batch
    forward_s: float = 0.0  # inside the model (also booked per namespace in DecodeStats)
    step_s: float = 0.0  # whole steps: forward_s + the batch bookkeeping around it
    peak_live_kv: int = 0  # most tokens whose KV requests being decoded held at once (pads excluded)
    peak_held_kv: int = 0  # most tokens whose KV was held at once: by those requests and by the prefix cache

    def held_kv(self, live: int, cached: int) -> None:
        """Count a moment at which ``live`` entries are decoded and ``cached`` wait in the prefix cache."""
        self.peak_live_kv = max(self.peak_live_kv, live)
        self.peak_held_kv = max(self.peak_held_kv, live + cached)


class RunningBatch:
    """The rows decoding together and their batch KV; :meth:`step` admits joiners, decodes once, retires the finished.

    Not thread-safe by itself: the caller holds the backend's lock and
    ``torch.inference_mode()`` around each step.
    """

    def __init__(self, host: BatchHost):
        self.host = host
        self.rows: list[Row] = []  # decoding
        self.held: list[tuple[Row, Any]] = []  # joiners waiting for a prefill forward, with their cached prefix
        self.cache: Any = None  # DynamicCache over self.rows
        self.mask: Any = None  # [rows, columns] 1 = the row's own token

    @property
    def members(self) -> list[Row]:
        """Every request the batch holds: decoding or waiting for its prefill."""
        return self.rows + [row for row, _ in self.held]

    def step(self, joiners: list[Row]) -> list[Row]:
        """Admit ``joiners`` (:meth:`_admit`), decode every row one token; returns the rows that finished."""
        started = time.perf_counter()
        done: list[Row] = [row for row in self.members if row.finish]  # dropped by the caller (cancelled)
        if done:
            self.held = [(row, cache) for row, cache in self.held if not row.finish]
            self._retire()
        if joiners or self.held:
            done += self._admit(joiners)
        if self.rows:
            done += self._decode()
        live = (int(self.mask.sum()) if self.mask is not None else 0) + sum(c.get_seq_length() for _, c in self.held)
        self.host.step_stats.held_kv(live, self.host.prefix_cache.entries)
        self.host.step_stats.step_s += time.perf_counter() - started
        return done

    def fail(self, exc: BaseException) -> list[Row]:
        """Every row gets ``exc`` (an engine error mid-step leaves the batch KV unknown) and the batch empties."""
        rows, self.rows, self.held = self.members, [], []
        self.cache = self.mask = None
        for row in rows:
            row.outcome = exc
        return rows

    # ----- the two forwards -------------------------------------------------

    def _admit(self, joiners: list[Row]) -> list[Row]:
        """Take each joiner's cached prefix; short uncached suffixes join the decode step, long ones are prefilled.

        On a small model a forward's cost is mostly per call, so a prefill
        forward costs about one decode step of every running row, while feeding
        a suffix of ``s`` tokens through the decode steps, one per step, costs
        only that row ``s - 1`` steps, and a joiner held back for a step costs
        it one step. So a joiner whose suffix is shorter than the running batch
        joins directly; longer ones are held until the steps they waited add up
        to ``HOLD_SHARE`` of the running rows (or nothing runs), then prefilled
        together in one forward, with every other joiner that has more than one
        uncached token.
        """
        host = self.host
        running = len(self.rows)
        direct, short = [], []
        for row in joiners:
            taken = host.prefix_cache.take(row.namespace, row.prompt, row.request.eviction)
            row.reused, row.positions, row.output_position = taken.reused, taken.positions, taken.next_position
            row.exact, row.evicted, row.rerotated = taken.exact, taken.evicted, taken.rerotated
            host.namespace_stats(row.namespace).cached_tokens += row.reused
            suffix = len(row.prompt) - row.reused
            if row.reused and suffix == 1:
                direct.append((row, taken.cache))
            elif row.reused and suffix - 1 < running:
                short.append((row, taken.cache))
            else:
                self.held.append((row, taken.cache))
        prefill: list[tuple[Row, Any]] = []
        if self.held and sum(row.held_steps for row, _ in self.held) >= HOLD_SHARE * running:
            prefill, self.held = self.held + short, []
        else:
            direct += short
            for row, _ in self.held:
                row.held_steps += 1
        if direct:
            for row, _ in direct:
                row.feed, row.pending = row.prompt[row.reused], row.prompt[row.reused + 1 :]
                row.position = row.positions[row.reused]
            rows = [row for row, _ in direct]
            lengths = [row.reused for row in rows]
            cache = _stack_caches(host.model.config, [c for _, c in direct], lengths)
            mask = _left_padded_mask(lengths, max(lengths), device=host.model.device)
            self._merge(rows, cache, mask)
        host.step_stats.joined_direct += len(direct)
        host.step_stats.joined_prefilled += len(prefill)
        return self._prefill(prefill) if prefill else []

    def _prefill(self, joiners: list[tuple[Row, Any]]) -> list[Row]:
        """Prefill the joiners' uncached suffixes in one left-padded forward; those that go on join the batch."""
        import torch

        host = self.host
        device = host.model.device
        pad = host.tokenizer.hf.pad_token_id or 0
        rows = [row for row, _ in joiners]
        suffixes = [row.prompt[row.reused :] for row in rows]
        past, width = max(row.reused for row in rows), max(map(len, suffixes))
        cache = _stack_caches(host.model.config, [c for _, c in joiners], [row.reused for row in rows])
        feed = torch.tensor([[pad] * (width - len(x)) + x for x in suffixes], device=device)
        mask = torch.cat(
            [
                _left_padded_mask([row.reused for row in rows], past, device),
                _left_padded_mask([len(x) for x in suffixes], width, device),
            ],
            dim=1,
        )
        positions = torch.tensor(
            [[0] * (width - len(x)) + row.positions[row.reused :] for row, x in zip(rows, suffixes, strict=True)],
            device=device,
        )
        logits = self._forward(
            rows, [len(x) for x in suffixes],
            input_ids=feed, attention_mask=mask, position_ids=positions, **with_cache(cache),
        )  # fmt: skip
        host.step_stats.prefill_forwards += 1
        self._pick(rows, logits)
        keep = [i for i, row in enumerate(rows) if not row.finish]
        for i, row in enumerate(rows):
            if row.finish:
                self._store(row, _row_cache(host.model.config, cache, mask, i, row))
        if keep:
            index = torch.tensor(keep, device=device)
            if len(keep) < len(rows):
                cache.batch_select_indices(index)
                mask = mask[index]
            self._merge([rows[i] for i in keep], cache, mask)
        return [row for row in rows if row.finish]

    def _decode(self) -> list[Row]:
        import torch

        device = self.host.model.device
        feed = torch.tensor([[row.feed] for row in self.rows], device=device)
        positions = torch.tensor([[row.position] for row in self.rows], device=device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self._forward(
            self.rows, None,
            input_ids=feed, attention_mask=self.mask, position_ids=positions, **with_cache(self.cache),
        )  # fmt: skip
        stats = self.host.step_stats
        stats.decode_steps += 1
        stats.rows_decoded += len(self.rows)
        self._pick(self.rows, logits)
        done = [row for row in self.rows if row.finish]
        if done:
            self._retire()
        return done

    def _forward(self, rows: list[Row], prefill: list[int] | None, **inputs: Any) -> Any:
        """One model call over ``rows``; its time is booked to each row's namespace by its share of the rows.

        Forwards that compute a row's prompt tokens are booked as its prefill,
        the rest as decoding.
        """
        host = self.host
        started = time.perf_counter()
        with host.row_adapters.rows([row.namespace or BASE_ADAPTER for row in rows], host.model.device):
            logits = host.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        elapsed = time.perf_counter() - started
        host.step_stats.forward_s += elapsed
        share = elapsed / len(rows)
        seen = set()
        for i, row in enumerate(rows):
            stats = host.namespace_stats(row.namespace)
            if not row.output:  # computing its prompt: a prefill, or a joiner's suffix fed through the decode steps
                stats.prefill_s += share
                stats.prefill_tokens += prefill[i] if prefill is not None else 1
            else:
                stats.decode_s += share
                stats.decode_tokens += 1
                if row.namespace not in seen:
                    seen.add(row.namespace)
                    stats.decode_steps += 1
        return logits

    def _pick(self, rows: list[Row], logits: Any) -> None:
        greedy = logits.argmax(-1).tolist()  # one call for the whole batch: exact, like a per-row argmax
        for i, row in enumerate(rows):
            if row.pending:  # a joiner still feeding its prompt: these logits predict a token it already has
                row.feed = row.pending.pop(0)
                row.position = row.positions[len(row.prompt) - len(row.pending) - 1]
                continue
            row.output.append(greedy[i] if row.picker is None else row.picker(logits[i]))
            row.feed = row.output[-1]
            row.position = row.output_position + len(row.output) - 1
            row.finish = self.host.stop_rule.reason(len(row.prompt), row.output, row.request)

    # ----- joining and leaving ----------------------------------------------

    def _merge(self, rows: list[Row], cache: Any, mask: Any) -> None:
        """Append ``rows`` (with their cache and mask) to the batch, left-padding the shorter side."""
        import torch
        from torch.nn.functional import pad

        if not self.rows:
            self.rows, self.cache, self.mask = rows, _growing(cache), mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        merged = empty_cache(self.host.model.config)
        for layer, (ours, theirs) in enumerate(zip(self.cache.layers, cache.layers, strict=True)):
            parts = []
            for name in ("keys", "values"):
                a, b = getattr(ours, name), getattr(theirs, name)
                parts.append(
                    torch.cat([pad(a, (0, 0, width - a.shape[2], 0)), pad(b, (0, 0, width - b.shape[2], 0))], dim=0)
                )
            merged.update(*parts, layer)
        self.cache = _growing(merged)
        self.mask = torch.cat([pad(self.mask, (width - self.mask.shape[1], 0)), pad(mask, (width - mask.shape[1], 0))])
        self.rows = self.rows + rows

    def _store(self, row: Row, sequence: CachedSequence) -> None:
        """A finished row's KV goes to the prefix cache, unless nothing can continue it."""
        if not self.host.stop_rule.ends_rollout(row.namespace, row.output):
            self.host.prefix_cache.keep(row.namespace, sequence)

    def _retire(self) -> None:
        """Store the finished rows' KV (without pads) and cut them, and columns no row uses, out of the batch."""
        import torch

        keep = []
        for i, row in enumerate(self.rows):
            if row.finish:
                self._store(row, _row_cache(self.host.model.config, self.cache, self.mask, i, row))
            else:
                keep.append(i)
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in keep]
        first = int(self.mask.any(0).int().argmax())  # leading columns that only left rows used
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


class RowAdapters:
    """One adapter per batch row for a peft model's LoRA layers, set once per forward.

    peft's own mixed batch (``model(..., adapter_names=[...])``) registers a
    pre-forward hook on every LoRA layer for each call, walking all modules
    each time (a quarter of a decode step on the embedded model), and each
    layer then splits the batch by adapter with Python index lists. Here the
    hooks stay registered: before a plain LoRA ``Linear`` (no DoRA-style
    variant) runs, it is told every row is ``"__base__"`` (peft computes the
    base layer only), and after it, each adapter's rows get that adapter's
    ``lora_B(lora_A(dropout(x))) * scaling`` added (``index_add_`` with one
    index tensor per adapter, made once per forward): the same sum peft
    computes. Other LoRA layers get the real ``adapter_names``, peft's mixed
    path. Outside ``rows`` the layers run as ``set_adapter`` /
    ``disable_adapter`` left them.
    """

    def __init__(self) -> None:
        self._names: list[str] | None = None
        self._base: list[str] = []
        self._groups: list[tuple[str, Any]] = []  # (adapter, row index tensor)
        self._hooked: weakref.WeakSet = weakref.WeakSet()

    def attach(self, model: Any) -> None:
        """Hook the model's LoRA layers that are not hooked yet (after each adapter load)."""
        if not isinstance(getattr(model, "peft_config", None), dict):
            return
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            if isinstance(module, LoraLayer) and module not in self._hooked:
                module.register_forward_pre_hook(self._inject, with_kwargs=True)
                module.register_forward_hook(self._add_deltas, with_kwargs=True)
                self._hooked.add(module)

    @contextmanager
    def rows(self, names: list[str], device: Any) -> Iterator[None]:
        """Run the forwards inside with ``names[i]`` as row i's adapter (a model without LoRA ignores them)."""
        import torch

        if len(self._hooked):
            groups: dict[str, list[int]] = {}
            for i, name in enumerate(names):
                if name != BASE_ADAPTER:
                    groups.setdefault(name, []).append(i)
            self._names, self._base = names, [BASE_ADAPTER] * len(names)
            self._groups = [(name, torch.tensor(rows, device=device)) for name, rows in groups.items()]
        try:
            yield
        finally:
            self._names, self._groups = None, []

    def _own_delta(self, module: Any) -> bool:
        from peft.tuners.lora import Linear

        return isinstance(module, Linear) and not module.lora_variant and not module.merged

    def _inject(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._names is not None:
            kwargs["adapter_names"] = self._base if self._own_delta(module) else self._names
        return args, kwargs

    def _add_deltas(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self._groups or module.disable_adapters or not self._own_delta(module):
            return output
        x = args[0] if args else kwargs["x"]
        for name, rows in self._groups:
            if name not in module.lora_A:
                continue
            lora_a = module.lora_A[name]
            sub = x.index_select(0, rows).to(lora_a.weight.dtype)
            delta = module.lora_B[name](lora_a(module.lora_dropout[name](sub))) * module.scaling[name]
            output.index_add_(0, rows, delta.to(output.dtype))
        return output


def _growing(cache: Any) -> Any:
    """``cache`` with its plain dynamic layers appending into spare room instead of concatenating.

    A ``DynamicLayer`` concatenates, copying the whole batch KV at every decode
    step; on the embedded model, with rows of different lengths left-padded to
    the longest, that copy was a fifth of a step. Only the running batch's
    cache grows this way; cut-out rows and stored sequences are plain copies.
    """
    from transformers.cache_utils import DynamicLayer

    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = _growing_layer_class()
    return cache


@functools.cache
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """Keys and values are views of buffers with spare room; an update writes the new columns into it."""

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                return super().update(key_states, value_states, *args, **kwargs)
            self.keys, self._key_room = _appended(self.keys, getattr(self, "_key_room", None), key_states)
            self.values, self._value_room = _appended(self.values, getattr(self, "_value_room", None), value_states)
            return self.keys, self.values

    return GrowingLayer


def _appended(view: Any, buffer: Any, new: Any) -> tuple[Any, Any]:
    """``cat([view, new], dim=-2)`` as a view of ``buffer`` if ``view`` is its start and it has room, else of a new one.

    ``view`` stops being the buffer's start when the batch replaces it (rows
    leave, leading columns are cut): the next update then copies it once.
    """
    used, n = view.shape[-2], new.shape[-2]
    if (
        buffer is None
        or view.data_ptr() != buffer.data_ptr()
        or view.shape[:2] != buffer.shape[:2]
        or view.stride() != buffer.stride()
        or used + n > buffer.shape[-2]
    ):
        buffer = view.new_empty((*view.shape[:2], 2 * (used + n) + 64, view.shape[-1]))
        buffer[:, :, :used] = view
    buffer[:, :, used : used + n] = new
    return buffer[:, :, : used + n], buffer


def _left_padded_mask(lengths: list[int], width: int, device: Any) -> Any:
    """[rows, width] attention mask, row r's last ``lengths[r]`` columns its own."""
    import torch

    columns = torch.arange(width, device=device)
    return (columns >= width - torch.tensor(lengths, device=device)[:, None]).long()


def _stack_caches(config: Any, caches: list[Any], lengths: list[int]) -> Any:
    """One batch cache from per-sequence caches of ``lengths`` tokens, each left-padded to the longest."""
    batch = empty_cache(config)
    past = max(lengths)
    if past == 0:
        return batch
    filled = [c for c, n in zip(caches, lengths, strict=True) if n]
    for layer, template in enumerate(filled[0].layers):
        stacked = []
        for part in ("keys", "values"):
            like = getattr(template, part)
            out = like.new_zeros((len(caches), like.shape[1], past, like.shape[3]))
            for row, (cache, n) in enumerate(zip(caches, lengths, strict=True)):
                if n:
                    out[row, :, past - n :] = getattr(cache.layers[layer], part)[0]
            stacked.append(out)
        batch.update(*stacked, layer)
    return batch


def _row_cache(config: Any, cache: Any, mask: Any, index: int, row: Row) -> CachedSequence:
    """Row ``index`` of a batch cache without its padding: what the finished ``row`` leaves to the prefix cache."""
    columns = mask[index].nonzero().squeeze(-1)
    single = empty_cache(config)
    for layer, data in enumerate(cache.layers):
        single.update(
            data.keys[index : index + 1].index_select(2, columns),
            data.values[index : index + 1].index_select(2, columns),
            layer,
        )
    return CachedSequence.finished(row.prompt, row.output, single, row.positions, row.output_position, row.exact)


def check_adapter(adapter: str | None, loaded: list[str]) -> None:
    """Unknown names fail with SGLang's message (``srt/managers/tokenizer_manager.py``)."""
    if adapter is not None and adapter not in loaded:
        raise BackendError(f"Got LoRA adapter that has never been loaded: {adapter!r} (loaded: {loaded})")
