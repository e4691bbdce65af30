"""SGLang 0.5.23's prefix (radix) cache, as the stand-in reports ``cached_tokens`` from it.

The rules, with the SGLang source each comes from:

* a finished request inserts its prompt AND its output, up to the last token
  whose KV was computed (``mem_cache/common.py: release_kv_cache`` ->
  ``mem_cache/radix_cache.py: RadixCache.checkpoint``: ``fill_ids[:owned_kv_len]``,
  i.e. prompt + output less the last sampled token);
* a request reuses the longest cached token prefix in its namespace, at most
  ``input_len - 1`` tokens (the last prompt token is always recomputed:
  ``managers/schedule_batch.py: _compute_max_prefix_len``);
* namespaces: a LoRA request's ``extra_key`` carries its adapter's ``lora_id``, so
  the base model and every adapter load have disjoint trees
  (``mem_cache/radix_cache.py: RadixKey``, ``match_prefix``); a dynamic load gets
  a fresh id (``managers/tokenizer_control_mixin.py: load_lora_adapter``);
* capacity is counted in tokens (the KV pool, ``max_total_num_tokens``), and
  eviction frees least-recently-used leaves first until the tree fits
  (``mem_cache/radix_cache.py: evict``), so a shared prefix costs its tokens once
  and survives while any branch under it is in use.

Page size 1 (SGLang's default for most attention backends). Nodes hold token
runs (a compressed radix tree), so a 100k-token tree is a few thousand objects.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Hashable, Sequence


class _Node:
    __slots__ = ("children", "key", "last_access", "parent")

    def __init__(self, key: tuple[int, ...], parent: _Node | None, tick: int):
        self.key = key
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.last_access = tick


def _common(key: tuple[int, ...], ids: Sequence[int], start: int) -> int:
    n = 0
    limit = min(len(key), len(ids) - start)
    while n < limit and key[n] == ids[start + n]:
        n += 1
    return n


class RadixCache:
    """Token-budgeted LRU radix tree with one namespace per adapter load (see the module docstring)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"RadixCache capacity must be >= 1 token, got {capacity}")
        self.capacity = capacity
        self.size = 0  # tokens held, over all namespaces
        self._roots: dict[Hashable, _Node] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    def match(self, namespace: Hashable, ids: Sequence[int]) -> int:
        """Cached tokens a request with prompt ``ids`` reuses (refreshing their LRU time)."""
        with self._lock:
            node = self._roots.get(namespace)
            matched, tick = 0, next(self._clock)
            while node is not None and matched < len(ids):
                child = node.children.get(ids[matched])
                if child is None:
                    break
                common = _common(child.key, ids, matched)
                child.last_access = tick
                matched += common
                node = child if common == len(child.key) else None
            return min(matched, max(len(ids) - 1, 0))

    def insert(self, namespace: Hashable, ids: Sequence[int]) -> None:
        """Cache ``ids`` (prompt + output of a finished request), then evict down to capacity."""
        with self._lock:
            tick = next(self._clock)
            node = self._roots.setdefault(namespace, _Node((), None, tick))
            position = 0
            while position < len(ids):
                child = node.children.get(ids[position])
                if child is None:
                    node.children[ids[position]] = _Node(tuple(ids[position:]), node, tick)
                    self.size += len(ids) - position
                    break
                common = _common(child.key, ids, position)
                if common < len(child.key):  # split: the shared run becomes its own node
                    middle = _Node(child.key[:common], node, tick)
                    child.key, child.parent = child.key[common:], middle
                    middle.children[child.key[0]] = child
                    node.children[ids[position]] = middle
                    child = middle
                child.last_access = tick
                node, position = child, position + common
            self._evict()

    def drop(self, namespace: Hashable) -> None:
        """Forget one namespace (an unloaded adapter's tree is unreachable: its id never returns)."""
        with self._lock:
            root = self._roots.pop(namespace, None)
            if root is not None:
                self.size -= _tree_size(root)

    def clear(self) -> None:
        """``/flush_cache``."""
        with self._lock:
            self._roots.clear()
            self.size = 0

    def _evict(self) -> None:
        if self.size <= self.capacity:
            return
        order = itertools.count()  # ties: insertion order, never comparing nodes
        heap = [(leaf.last_access, next(order), leaf) for root in self._roots.values() for leaf in _leaves(root)]
        heapq.heapify(heap)
        while self.size > self.capacity and heap:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            self.size -= len(leaf.key)
            if not parent.children and parent.parent is not None:
                heapq.heappush(heap, (parent.last_access, next(order), parent))


def _leaves(root: _Node) -> list[_Node]:
    out, stack = [], list(root.children.values())
    while stack:
        node = stack.pop()
        if node.children:
            stack.extend(node.children.values())
        else:
            out.append(node)
    return out


def _tree_size(root: _Node) -> int:
    total, stack = 0, list(root.children.values())
    while stack:
        node = stack.pop()
        total += len(node.key)
        stack.extend(node.children.values())
    return total
