"""apply_deletions: anchor resolution, skip reasons, overlaps, and the invariants (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freelm.free import Deletion, apply_deletions, remove_spans

TEXT = "Plan: add.\nTry 1: 2+2=5. Wrong.\nTry 2: 2+2=4. Right.\nAnswer 4.\n"


def test_deletes_from_prefix_to_end_of_first_suffix_after_it():
    edit = apply_deletions(TEXT, [Deletion("Try 1:", "Wrong.\n")])
    assert edit.text == "Plan: add.\nTry 2: 2+2=4. Right.\nAnswer 4.\n"
    assert edit.spans == [(11, 32)] and TEXT[11:32] == "Try 1: 2+2=5. Wrong.\n"
    assert edit.applied == [Deletion("Try 1:", "Wrong.\n")] and edit.skipped == []


def test_suffix_is_searched_after_the_prefix_not_inside_it():
    text = "abc abc-end tail"
    edit = apply_deletions(text, [Deletion("abc-", "abc")])
    assert edit.skipped == [(Deletion("abc-", "abc"), "suffix_not_found")]
    edit = apply_deletions("xx A..B..B yy", [Deletion("A", "B")])
    assert edit.text == "xx ..B yy"


@pytest.mark.parametrize(
    "deletion, reason",
    [
        (Deletion("", "x"), "empty_anchor"),
        (Deletion("Try", ""), "empty_anchor"),
        (Deletion("Try 3:", "."), "prefix_not_found"),
        (Deletion("Try", "."), "prefix_ambiguous"),
        (Deletion("Answer", "nowhere"), "suffix_not_found"),
    ],
)
def test_skip_reasons(deletion, reason):
    edit = apply_deletions(TEXT, [deletion])
    assert edit.text == TEXT and edit.spans == [] and edit.skipped == [(deletion, reason)]


def test_overlapping_occurrences_count_as_ambiguous():
    assert apply_deletions("aaa", [Deletion("aa", "a")]).skipped[0][1] == "prefix_ambiguous"


def test_all_commands_resolve_against_the_original_text():
    # the second command's prefix lies inside the first span: it still resolves (and merges)
    cmds = [Deletion("Try 1:", "Right."), Deletion("Try 2:", "Answer")]
    edit = apply_deletions(TEXT, cmds)
    assert edit.spans == [(11, TEXT.index("Answer") + len("Answer"))]
    assert edit.text == "Plan: add.\n 4.\n" and len(edit.applied) == 2


def test_overlap_skip_policy():
    cmds = [Deletion("Try 1:", "Right."), Deletion("Try 2:", "Answer")]
    edit = apply_deletions(TEXT, cmds, overlap="skip")
    assert edit.skipped == [(cmds[1], "overlap")] and len(edit.spans) == 1
    with pytest.raises(ValueError):
        apply_deletions(TEXT, cmds, overlap="union")  # type: ignore[arg-type]


def test_remove_spans_merges_and_validates():
    assert remove_spans("0123456789", [(5, 7), (1, 3), (2, 4), (7, 8)]).spans == [(1, 4), (5, 8)]
    with pytest.raises(ValueError, match="outside"):
        remove_spans("abc", [(2, 9)])


# --------------------------------------------------------------------- properties

anchors = st.text(alphabet="ab\n .", min_size=0, max_size=4)


@given(st.text(alphabet="ab\n .x", max_size=200), st.lists(st.tuples(anchors, anchors), max_size=6))
def test_output_is_input_minus_reported_disjoint_spans(text, pairs):
    edit = apply_deletions(text, [Deletion(p, s) for p, s in pairs])
    spans = edit.spans
    assert all(0 <= s < e <= len(text) for s, e in spans)
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))  # sorted, disjoint, not touching
    rebuilt, pos = [], 0
    for s, e in spans:
        rebuilt.append(text[pos:s])
        pos = e
    rebuilt.append(text[pos:])
    assert edit.text == "".join(rebuilt)
    assert len(edit.applied) + len(edit.skipped) == len(pairs)
    assert len(text) - len(edit.text) == edit.chars_deleted


@given(st.text(max_size=300), st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=8))
def test_never_raises_on_arbitrary_commands(text, pairs):
    apply_deletions(text, [Deletion(p, s) for p, s in pairs])


@given(
    st.text(alphabet="ab\n ", max_size=100),
    st.text(alphabet="ab\n ", max_size=100),
    st.lists(st.tuples(anchors, anchors), max_size=5),
)
def test_protected_region_is_untouched(problem, thinking, pairs):
    """The loop passes only the thinking: the problem text around it can never change."""
    edit = apply_deletions(thinking, [Deletion(p, s) for p, s in pairs])
    context = "<|im_start|>user\n" + problem + "<|im_end|>\n<think>\n" + edit.text
    assert context.startswith("<|im_start|>user\n" + problem + "<|im_end|>\n<think>\n")


@given(st.lists(st.text(alphabet="abc", min_size=3, max_size=6), min_size=2, max_size=10, unique=True))
def test_unique_line_anchors_always_resolve(lines):
    text = "".join(f"<{line}>\n" for line in lines)
    first, last = lines[0], lines[-1]
    edit = apply_deletions(text, [Deletion(f"<{first}>", f"<{last}>\n")])
    assert edit.text == "" and edit.skipped == []
