"""pass@k, maj@k and avg@n: per-problem estimators, averaged over problems by the caller."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from itertools import combinations

#: Above this many k-subsets, maj@k is estimated from this many seeded random subsets.
MAJ_SUBSET_LIMIT = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) = 1 - C(n-c, k) / C(n, k), as a product that never overflows."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    p = 1.0
    for i in range(n - c + 1, n + 1):
        p *= 1.0 - k / i
    return 1.0 - p


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself (the paper's 8 rollouts give 1, 2, 4, 8)."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def _majority_correct(votes: Sequence[tuple[str | None, bool]]) -> float:
    """Majority vote of one subset; ties count as the expected value of a random tie-break."""
    counts = Counter(answer for answer, _ in votes if answer is not None)
    if not counts:
        return 0.0
    top = max(counts.values())
    tied = [answer for answer, count in counts.items() if count == top]
    correct = {answer for answer, ok in votes if ok and answer is not None}
    return sum(answer in correct for answer in tied) / len(tied)


def maj_at_k(votes: Sequence[tuple[str | None, bool]], k: int) -> float:
    """Expected correctness of a majority vote over k of the n rollouts, drawn without replacement.

    ``votes`` = one ``(normalized answer or None, correct)`` per rollout;
    unanswered rollouts do not vote. Exact (all k-subsets) when there are at
    most :data:`MAJ_SUBSET_LIMIT` subsets, else a seeded estimate, so it is
    reproducible either way.
    """
    n = len(votes)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if math.comb(n, k) <= MAJ_SUBSET_LIMIT:
        subsets = list(combinations(votes, k))
    else:
        rng = random.Random(0)
        subsets = [rng.sample(list(votes), k) for _ in range(MAJ_SUBSET_LIMIT)]
    return sum(_majority_correct(s) for s in subsets) / len(subsets)


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(len)); SE is 0 for fewer than two values."""
    if not values:
        return (math.nan, math.nan)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return (mean, 0.0)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return (mean, math.sqrt(var / len(values)))
