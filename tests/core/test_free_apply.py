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


@given(st.text(max_size=300), st.data())
def test_arbitrary_commands_give_an_accounted_edit(text, data):
    """Any text and anchors (random ones and pieces of the text): no exception, every command applied or
    skipped with a known reason, and each applied one's span runs from its unique prefix to the end of a
    suffix after it."""
    from freelm.free import SKIP_REASONS

    piece = st.integers(0, len(text)).flatmap(lambda i: st.integers(i, min(len(text), i + 8)).map(lambda j: text[i:j]))
    anchor = st.one_of(st.text(max_size=8), piece)
    pairs = data.draw(st.lists(st.tuples(anchor, anchor), max_size=8))
    cmds = [Deletion(p, s) for p, s in pairs]
    edit = apply_deletions(text, cmds)
    assert len(edit.applied) + len(edit.skipped) == len(cmds)
    assert all(reason in SKIP_REASONS for _, reason in edit.skipped)
    for d in edit.applied:
        start = text.index(d.prefix)
        assert text.find(d.prefix, start + 1) < 0  # unique, overlapping occurrences included
        end = text.index(d.suffix, start + len(d.prefix)) + len(d.suffix)
        assert any(s <= start and end <= e for s, e in edit.spans)  # inside one (merged) span
    assert len(edit.text) == len(text) - edit.chars_deleted


@given(st.lists(st.text(alphabet="abc", min_size=3, max_size=6), min_size=2, max_size=10, unique=True))
def test_unique_line_anchors_always_resolve(lines):
    text = "".join(f"<{line}>\n" for line in lines)
    first, last = lines[0], lines[-1]
    edit = apply_deletions(text, [Deletion(f"<{first}>", f"<{last}>\n")])
    assert edit.text == "" and edit.skipped == []


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
