"""pass@k / maj@k estimators against brute-force enumeration."""

import math
from itertools import combinations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freelm.evaluation.passk import _majority_correct, k_values, maj_at_k, mean_and_se, pass_at_k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_form_and_edges():
    assert pass_at_k(8, 0, 1) == 0.0
    assert pass_at_k(8, 8, 8) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(8, 3, 6) == 1.0  # n - c < k
    # large n: the product form neither overflows nor loses precision
    assert pass_at_k(1000, 10, 50) == pytest.approx(1 - math.comb(990, 50) / math.comb(1000, 50), rel=1e-9)
    for bad in [(8, 9, 1), (8, 2, 0), (8, 2, 9)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_k_values():
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(1) == [1]


def brute_maj(votes, k):
    total = 0.0
    subsets = list(combinations(votes, k))
    for s in subsets:
        counts = {}
        for a, _ in s:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        if not counts:
            continue
        top = max(counts.values())
        tied = [a for a, c in counts.items() if c == top]
        good = {a for a, ok in s if ok}
        total += sum(a in good for a in tied) / len(tied)
    return total / len(subsets)


answers = st.lists(st.sampled_from([None, "1", "2", "3"]), min_size=1, max_size=7)


@given(answers, st.data())
def test_maj_at_k_matches_enumeration(votes, data):
    labelled = [(a, a == "1") for a in votes]
    k = data.draw(st.integers(1, len(votes)))
    assert maj_at_k(labelled, k) == pytest.approx(brute_maj(labelled, k))


def test_maj_at_k_examples():
    votes = [("70", True), ("70", True), ("72", False), (None, False)]
    assert maj_at_k(votes, 1) == pytest.approx(0.5)
    assert maj_at_k(votes, 2) == pytest.approx(4 / 6)
    assert maj_at_k(votes, 4) == 1.0
    assert maj_at_k([(None, False)] * 3, 2) == 0.0


def test_mean_and_se():
    mean, se = mean_and_se([0.5, 0.75, 0.25, 0.5])
    assert mean == 0.5
    assert se == pytest.approx(math.sqrt(((0.25**2) * 2 / 3) / 4))
    assert mean_and_se([1.0]) == (1.0, 0.0)


def test_sampled_majority_vote_is_reproducible_and_close_to_exact():
    votes = [("1", True)] * 6 + [("2", False)] * 5 + [(None, False)] * 5  # C(16, 8) = 12870 subsets: sampled
    exact = sum(_majority_correct(s) for s in combinations(votes, 8)) / 12870
    estimate = maj_at_k(votes, 8)
    assert estimate == maj_at_k(votes, 8) and estimate == pytest.approx(exact, abs=0.03)


def test_estimator_errors_and_the_two_value_standard_error():
    assert mean_and_se([0.0, 1.0]) == (0.5, pytest.approx(0.5))
    with pytest.raises(ValueError, match="need 0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="need 1 <= k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="need 1 <= k <= n"):
        maj_at_k([("1", True)], 2)
