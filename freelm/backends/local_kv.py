"""The in-process engine's KV: one sequence's cache, the prefix cache over recent sequences, eviction in place.

:class:`PrefixCache` plays SGLang's radix cache for :class:`~freelm.backends.local.LocalBackend`
and its running batch (:mod:`freelm.backends.local_batch`): an LRU of recent
sequences' KV per adapter namespace (base and adapter KV differ, so they never
share). A request takes the sequence with the longest common token prefix
(:meth:`PrefixCache.take`) and a finished request's KV is stored for the next
one (:meth:`PrefixCache.keep`). Both modules use only this interface, so
neither reaches into the other.

A request that carries an :class:`~freelm.backends.base.Eviction` (a reasoning
call after a cleaning, under an eviction strategy) may instead take its
rollout's previous sequence with the deleted tokens' entries removed from
every layer, so the tokens after the first deletion are not prefilled again:

* ``evict-gaps`` (Memento's scheme, ``vllm/v1/worker/gpu_model_runner.py``):
  the survivors keep their RoPE positions, so positions have gaps where the
  deleted tokens were, and new tokens continue the rollout's position counter
  from the old end. Physical order in the cache is the survivors' order; the
  attention mask is physical, positions only feed RoPE.
* ``evict-rerotate`` (kvpress' ``KeyRerotationPress``): each kept key is
  rotated by (new position - old position) so positions are contiguous again,
  exactly what a prefill of the kept tokens would give a key at layer 0; from
  layer 1 on the kept entries still hold what the deleted tokens contributed.

torch and transformers are imported lazily (``import freelm`` stays light).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from freelm.backends.base import Eviction


@dataclass
class CachedSequence:
    """KV for exactly ``ids``: a request's prompt and output less the last sampled token (never fed).

    ``positions[i]`` is the RoPE position entry ``i`` was computed at; ``next_id``
    (the last sampled token) goes at ``next_position``. Without gaps both are
    the plain count (``positions == range(len(ids))``). ``exact`` entries lead
    that a prefill of ``ids`` would compute alike; the ones after were computed
    with deleted tokens visible or at gapped positions, so they are this
    rollout's alone: another request sharing their ids reuses at most the exact
    ones (:meth:`PrefixCache.take`).
    """

    ids: list[int]
    cache: Any  # a one-sequence transformers DynamicCache
    positions: list[int] = field(default_factory=list)
    next_position: int = 0
    next_id: int | None = None
    exact: int | None = None  # None: all
    nbytes: int = 0  # set when stored (what the byte bound counts)

    @classmethod
    def finished(
        cls,
        prompt: list[int],
        output: list[int],
        cache: Any,
        prompt_positions: list[int],
        output_position: int,
        exact: int | None = None,
    ) -> CachedSequence:
        """What a finished request leaves: KV for its prompt and output but the last token, and their positions.

        ``exact``: the request's lead tokens a prefill would compute alike (:attr:`Taken.exact`).
        """
        fed = len(output) - 1 if output else 0
        return cls(
            ids=prompt + output[:-1],
            cache=cache,
            positions=prompt_positions + list(range(output_position, output_position + fed)),
            next_position=output_position + fed,
            next_id=output[-1] if output else None,
            exact=exact,
        )

    @property
    def exact_entries(self) -> int:
        return len(self.ids) if self.exact is None else min(self.exact, len(self.ids))


@dataclass
class Taken:
    """What a request starts from: KV for its first ``reused`` tokens and the position of every one of its tokens."""

    cache: Any  # a one-sequence DynamicCache holding KV for exactly ``ids[:reused]``
    reused: int
    positions: list[int]  # one per token of the request's ids
    next_position: int  # of its first output token
    evicted: int = 0  # entries of deleted tokens removed in place
    rerotated: int = 0  # kept entries whose keys moved to another position
    exact: int | None = None  # lead tokens whose KV a prefill of the ids computes alike (None: all, outputs too)


class PrefixCache:
    """Recent sequences' KV per namespace (``None`` = base model), bounded in sequences and in bytes.

    ``size`` sequences per namespace and ``max_bytes`` of KV in all: the least
    recently stored sequence goes first (of its namespace for ``size``, of any
    namespace for ``max_bytes``). ``max_bytes=0`` or ``size=0`` keeps nothing.
    ``inv_freq`` is the model's RoPE frequencies (:func:`rope_frequencies`),
    which ``evict-rerotate`` needs. Not thread-safe by itself: the backend's
    lock is held around every call.
    """

    def __init__(self, config: Any, *, size: int, max_bytes: int, inv_freq: Any = None):
        self.config = config  # the model's config: an empty DynamicCache is built from it
        self.size = size
        self.max_bytes = max_bytes
        self.inv_freq = inv_freq
        self._lru: dict[str | None, OrderedDict[int, CachedSequence]] = {}
        self._next_key = 0

    def take(self, namespace: str | None, ids: list[int], eviction: Eviction | None = None) -> Taken:
        """The cached sequence sharing the longest prefix with ``ids``, cut to it (or an empty one).

        At least the last token of ``ids`` is always left to compute (its
        logits start decoding), as in SGLang. A sequence that is wholly a
        prefix of ``ids`` is taken over (the usual "reasoning continues" case);
        a partial match is copied, so the other sequence keeps its own tail.
        With an ``eviction``, a sequence that matches ``ids`` further once the
        deleted tokens are removed is taken over with them evicted (see the
        module's docstring).
        """
        lru = self._lru.setdefault(namespace, OrderedDict())
        best_key, best, plan = None, 0, None
        for key, seq in lru.items():
            shared = min(len(os.path.commonprefix([seq.ids, ids])), len(ids) - 1)
            # a branch off this sequence shares only its exact entries
            n = shared if shared == len(seq.ids) else min(shared, seq.exact_entries)
            if n > best:
                best_key, best, plan = key, n, None
            if eviction is None or not eviction.removed or shared < min(eviction.removed[0][0], len(ids) - 1):
                continue  # (not the rollout's previous sequence: it differs before the first deletion)
            evicting = _EvictionPlan.of(seq, ids, eviction)
            if evicting is not None and evicting.reused >= best:  # a tie too: the strategy decides the positions
                best_key, best, plan = key, evicting.reused, evicting
        if best_key is None:
            return Taken(empty_cache(self.config), 0, list(range(len(ids))), len(ids))
        seq = lru[best_key]
        if plan is not None:
            del lru[best_key]  # evicted in place: the sequence before the deletion is gone
            return plan.apply(seq, self.config, self.inv_freq)
        positions = seq.positions[:best]
        if best == len(seq.ids):  # the sequence continues: its inexact entries (if any) are this rollout's own
            del lru[best_key]
            cache, start, exact = seq.cache, seq.next_position, seq.exact
        else:  # the shared prefix only (all exact); the other sequence keeps its own tail
            # no clone needed: DynamicCache.update concatenates into new tensors, never writing in place
            cache = empty_cache(self.config)
            for layer, data in enumerate(seq.cache.layers):
                cache.update(data.keys[:, :, :best], data.values[:, :, :best], layer)
            start, exact = best, None
        positions += range(start, start + len(ids) - best)
        return Taken(cache, best, positions, start + len(ids) - best, exact=exact)

    def keep(self, namespace: str | None, sequence: CachedSequence) -> None:
        """Store ``sequence`` for the next request that shares its prefix (unless its KV is out of step with its ids)."""
        if sequence.cache.get_seq_length() != len(sequence.ids):  # such a cache must never be reused
            return
        sequence.nbytes = sum(t.nbytes for layer in sequence.cache.layers for t in (layer.keys, layer.values))
        lru = self._lru.setdefault(namespace, OrderedDict())
        self._next_key += 1
        lru[self._next_key] = sequence
        while len(lru) > self.size:
            lru.popitem(last=False)
        total = self.nbytes
        while total > self.max_bytes:  # the least recently stored sequence of any namespace goes first
            oldest = min((cached for cached in self._lru.values() if cached), key=lambda c: next(iter(c)))
            total -= oldest.popitem(last=False)[1].nbytes

    def sequences(self, namespace: str | None) -> list[CachedSequence]:
        """The sequences held for ``namespace``, least recently stored first."""
        return list(self._lru.get(namespace, {}).values())

    @property
    def nbytes(self) -> int:
        return sum(seq.nbytes for cached in self._lru.values() for seq in cached.values())

    @property
    def entries(self) -> int:
        """KV entries (tokens) held, over all namespaces."""
        return sum(len(seq.ids) for cached in self._lru.values() for seq in cached.values())

    def drop(self, namespace: str | None) -> None:
        """Forget one namespace (an adapter loaded or unloaded under that name: no stale KV hit)."""
        self._lru.pop(namespace, None)

    def clear(self) -> None:
        self._lru.clear()


@dataclass
class _EvictionPlan:
    """How a request continues a cached sequence with an eviction's deleted tokens removed.

    The previous context is the sequence's ids followed by its ``next_id``
    (``len(ids) + 1`` tokens); ``keep`` lists the entries that survive, in
    order. ``ids`` is that context without the deleted tokens, possibly with a
    re-encoded tail: a token that was in the old context keeps its position
    (``evict-gaps``), every other one continues the rollout's counter from the
    old end. ``evict-rerotate`` numbers them all contiguously instead.
    """

    eviction: Eviction
    keep: list[int]  # indices of the surviving entries whose KV is reused (the first ``reused`` of them)
    reused: int
    positions: list[int]  # one per token of the request's ids
    next_position: int
    evicted: int  # entries removed by the eviction (whether or not the survivors after them are reused)
    exact: int | None  # lead tokens of the ids a prefill computes alike: those before the first deletion (or gap)

    @classmethod
    def of(cls, seq: CachedSequence, ids: list[int], eviction: Eviction) -> _EvictionPlan | None:
        """The plan for ``seq``, or None when the eviction does not apply to it (ranges past its end, no gain)."""
        context = len(seq.ids) + 1
        if eviction.removed[-1][1] > context:
            return None
        survivors, last = [], 0
        for start, end in eviction.removed:
            survivors += range(last, start)
            last = end
        survivors += range(last, context)
        old = [*seq.ids, seq.next_id]
        old_positions = [*seq.positions, seq.next_position]
        matched = len(os.path.commonprefix([[old[i] for i in survivors], ids]))
        entries = sum(1 for i in survivors if i < len(seq.ids))
        reused = min(matched, entries, len(ids) - 1)
        if reused < min(eviction.removed[0][0], len(ids) - 1):
            return None  # it does not continue this sequence
        if eviction.strategy == "evict-rerotate":
            positions, next_position = list(range(len(ids))), len(ids)
        else:  # evict-gaps: old tokens keep their positions, new ones continue the counter
            counter = seq.next_position + 1
            new = len(ids) - matched
            positions = [old_positions[i] for i in survivors[:matched]] + list(range(counter, counter + new))
            next_position = counter + new
        evicted = sum(min(end, len(seq.ids)) - start for start, end in eviction.removed if start < len(seq.ids))
        moved = next((i for i, p in enumerate(positions) if p != i), len(positions))  # the first gap
        exact: int | None = min(seq.exact_entries, eviction.removed[0][0], moved)
        if next_position != len(ids):  # the output goes on after a gap
            exact = min(exact, len(ids))
        elif exact >= len(ids):
            exact = None
        return cls(eviction, survivors[:reused], reused, positions, next_position, evicted, exact)

    def apply(self, seq: CachedSequence, config: Any, inv_freq: Any) -> Taken:
        """Remove the evicted entries (and the survivors past the reused ones) from every layer of ``seq``."""
        import torch

        index = torch.tensor(self.keep, dtype=torch.long, device=seq.cache.layers[0].keys.device)
        old = [seq.positions[i] for i in self.keep]
        new = self.positions[: self.reused]
        moved = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b]
        cache = empty_cache(config)
        for layer, data in enumerate(seq.cache.layers):
            keys, values = data.keys.index_select(2, index), data.values.index_select(2, index)
            if moved:
                keys = rerotated(keys, old, new, inv_freq)
            cache.update(keys, values, layer)
        return Taken(cache, self.reused, self.positions, self.next_position, self.evicted, len(moved), self.exact)


def rerotated(keys: Any, old: list[int], new: list[int], inv_freq: Any) -> Any:
    """``keys`` (``[batch, heads, n, head_dim]``, RoPE applied at positions ``old``) as if applied at ``new``.

    RoPE rotates each pair of dimensions by ``position * inv_freq``, so a key
    moves from ``old`` to ``new`` by one more rotation of ``new - old``
    (transformers' ``rotate_half`` layout, as kvpress'
    ``KeyRerotationPress.rerotate_keys``); computed in float32. A model's
    attention scaling of cos/sin (YaRN) is already inside the keys and is
    unchanged by a pure rotation.
    """
    import torch

    delta = torch.tensor(new, dtype=torch.float32, device=keys.device) - torch.tensor(
        old, dtype=torch.float32, device=keys.device
    )
    angles = delta[:, None] * inv_freq.to(device=keys.device, dtype=torch.float32)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    k = keys.float()
    half = k.shape[-1] // 2
    turned = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k * cos + turned * sin).to(keys.dtype)


def eviction_refusal(model: Any, strategy: str, inv_freq: Any) -> str | None:
    """Why this model cannot resume with ``strategy`` in place (None: it can).

    A sliding-window layer keeps a rolling window whose slots are not the
    sequence's tokens, so no entry can be named for eviction; re-rotation needs
    frequencies that do not change with the length (:func:`rope_frequencies`).
    """
    if "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
        return f"{strategy} needs full-attention layers (this model has sliding-window ones)"
    if strategy == "evict-rerotate" and inv_freq is None:
        return "evict-rerotate needs RoPE frequencies that do not depend on the length (not dynamic or longrope)"
    return None


def rope_frequencies(model: Any) -> Any:
    """The model's RoPE ``inv_freq`` when a key can be moved by a rotation alone, else None.

    That holds for RoPE types whose frequencies do not depend on the sequence
    length (default, linear, llama3, YaRN); ``dynamic`` and ``longrope``
    recompute them as the sequence grows, so a cached key's rotation is not a
    function of its position alone.
    """
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if inv_freq is not None and hasattr(module, "rope_type"):
            return None if module.rope_type in ("dynamic", "longrope") else inv_freq.detach().clone()
    return None


def entry_bytes(model: Any) -> int:
    """Bytes of one token's KV entry over all layers (keys and values), from the model's config and dtype."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def empty_cache(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=config)


def with_cache(cache: Any) -> dict[str, Any]:
    """The forward's keyword for ``cache``: ``cache`` from transformers 5.24 on, ``past_key_values`` before.

    The old name still works on 5.24+ but warns on every forward (``Qwen3ForCausalLM.forward``: removed in 5.40).
    """
    return {_cache_keyword(): cache}


@functools.cache
def _cache_keyword() -> str:
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"
