"""The in-process engine's KV: one sequence's cache, the prefix cache over recent sequences, and the forward's cache.

:class:`PrefixCache` plays SGLang's radix cache for :class:`~freelm.backends.local.LocalBackend`
and its running batch (:mod:`freelm.backends.local_batch`): an LRU of recent
sequences' KV per adapter namespace (base and adapter KV differ, so they never
share). A request takes the sequence with the longest common token prefix
(:meth:`PrefixCache.take`) and a finished request's KV is stored for the next
one (:meth:`PrefixCache.keep`). Both modules use only this interface, so
neither reaches into the other.

torch and transformers are imported lazily (``import freelm`` stays light).
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class CachedSequence:
    """KV for exactly ``ids``: a request's prompt and output less the last sampled token (never fed)."""

    ids: list[int]
    cache: Any  # a one-sequence transformers DynamicCache
    nbytes: int = 0  # set when stored (what the byte bound counts)


class PrefixCache:
    """Recent sequences' KV per namespace (``None`` = base model), bounded in sequences and in bytes.

    ``size`` sequences per namespace and ``max_bytes`` of KV in all: the least
    recently stored sequence goes first (of its namespace for ``size``, of any
    namespace for ``max_bytes``). ``max_bytes=0`` or ``size=0`` keeps nothing.
    Not thread-safe by itself: the backend's lock is held around every call.
    """

    def __init__(self, config: Any, *, size: int, max_bytes: int):
        self.config = config  # the model's config: an empty DynamicCache is built from it
        self.size = size
        self.max_bytes = max_bytes
        self._lru: dict[str | None, OrderedDict[int, CachedSequence]] = {}
        self._next_key = 0

    def take(self, namespace: str | None, ids: list[int]) -> tuple[CachedSequence, int]:
        """The cached sequence sharing the longest prefix with ``ids``, cut to it (or an empty one), and that length.

        At least the last token of ``ids`` is always left to compute (its
        logits start decoding), as in SGLang. A sequence that is wholly a
        prefix of ``ids`` is taken over (the usual "reasoning continues" case);
        a partial match is copied, so the other sequence keeps its own tail.
        """
        lru = self._lru.setdefault(namespace, OrderedDict())
        best_key, best = None, 0
        for key, seq in lru.items():
            n = min(len(os.path.commonprefix([seq.ids, ids])), len(ids) - 1)
            if n > best:
                best_key, best = key, n
        if best_key is None:
            return CachedSequence(ids=[], cache=empty_cache(self.config)), 0
        seq = lru[best_key]
        if best == len(seq.ids):
            del lru[best_key]
            cache = seq.cache
        else:  # the shared prefix only; the other sequence keeps its own tail
            # no clone needed: DynamicCache.update concatenates into new tensors, never writing in place
            cache = empty_cache(self.config)
            for layer, data in enumerate(seq.cache.layers):
                cache.update(data.keys[:, :, :best], data.values[:, :, :best], layer)
        return CachedSequence(ids=ids[:best], cache=cache), best

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

    def drop(self, namespace: str | None) -> None:
        """Forget one namespace (an adapter loaded or unloaded under that name: no stale KV hit)."""
        self._lru.pop(namespace, None)

    def clear(self) -> None:
        self._lru.clear()


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
