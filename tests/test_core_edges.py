"""Edges the mutation run (scripts/mutation.sh) showed unguarded in the executor, the parser and pass@k."""

from __future__ import annotations

from itertools import combinations

import pytest

from freelm.evaluation.passk import _majority_correct, maj_at_k, mean_and_se, pass_at_k
from freelm.free import Deletion, apply_deletions, format_commands, parse_commands, remove_spans

TEXT = "Plan: add.\nTry 1: 2+2=5. Wrong.\nTry 2: 2+2=4. Right.\nAnswer 4.\n"


def test_skip_policy_keeps_disjoint_and_touching_spans_in_either_order():
    first, second = Deletion("Try 1:", "Wrong.\n"), Deletion("Try 2:", "Right.")  # (11, 32) and (32, 52)
    for commands in ([first, second], [second, first], [Deletion("Plan:", "add."), second]):
        edit = apply_deletions(TEXT, commands, overlap="skip")
        assert edit.skipped == [] and len(edit.applied) == 2, commands
    with pytest.raises(ValueError, match="overlap must be 'merge' or 'skip'"):
        apply_deletions(TEXT, [first], overlap="union")  # type: ignore[arg-type]


def test_empty_spans_are_ignored_not_fatal():
    assert remove_spans("abcdef", [(1, 1), (2, 4)]).text == "abef"
    assert remove_spans("abc", [(3, 3)]).spans == []


def test_parser_finds_the_list_after_false_starts_without_calling_it_truncated():
    for raw in ('see [here and [{"prefix": "a", "suffix": "b"}] then [', 'x [[{"prefix": "a", "suffix": "b"}]'):
        parsed = parse_commands(raw)
        assert parsed == [Deletion("a", "b")] and parsed.dropped == [], raw


def test_truncated_list_recovery_starts_at_the_list_not_inside_a_string():
    parsed = parse_commands('[{"prefix": "a[", "suffix": "b"}, {"prefix": "c')
    assert parsed == [Deletion("a[", "b")] and parsed.dropped == ["truncated_list_recovered"]


def test_single_object_inside_prose_and_named_drops():
    assert parse_commands('Delete this: {"prefix": "a", "suffix": "b"} thanks') == [Deletion("a", "b")]
    parsed = parse_commands('[{"prefix": "a", "suffix": "b"}, 3, {"prefix": "x"}]')
    assert parsed.dropped == ["item 1: not an object", "item 2: needs string 'prefix' and 'suffix'"]
    assert parse_commands("</think>  ").error == "empty_output"
    assert parse_commands(3).error == "not_text: int"  # type: ignore[arg-type]


def test_canonical_json_keeps_non_ascii_text_as_is():
    assert format_commands([Deletion("Étape", "≤ 3")]) == '[{"prefix": "Étape", "suffix": "≤ 3"}]'


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
