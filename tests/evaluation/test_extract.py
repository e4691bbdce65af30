"""Final-answer extraction from realistic reasoning outputs."""

import pytest

from freelm.evaluation.extract import extract_answer, last_boxed

THINK = "Let me set up coordinates.\nMaybe the answer is \\boxed{12}? No, recheck.\n"


@pytest.mark.parametrize(
    "response, expected",
    [
        (THINK + "</think>\n\nThe answer is $\\boxed{70}$.", "70"),
        # the box in the thinking is a draft; only the text after </think> counts
        (THINK + "</think>\n\nSo we get 70.", None),
        # the last box after </think> wins
        (THINK + "</think>\nFirst \\boxed{3}, corrected: \\boxed{5}.", "5"),
        # nested braces
        (THINK + "</think>\n$\\boxed{\\frac{3+i\\sqrt{3}}{2}}$", "\\frac{3+i\\sqrt{3}}{2}"),
        (THINK + "</think>\n\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        # spacing and \fbox
        (THINK + "</think>\n\\boxed {42}", "42"),
        (THINK + "</think>\n\\fbox{7}", "7"),
        # an unclosed box is ignored in favour of the last complete one
        (THINK + "</think>\n\\boxed{9} and then \\boxed{1", "9"),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response).answer == expected


def test_unanswered_reasons():
    assert extract_answer("I keep thinking \\boxed{4} and thinking").reason == "no_think_close"
    assert extract_answer(THINK + "</think>\nNo final box.").reason == "no_box"
    assert extract_answer(THINK + "</think>\n\\boxed{  }").reason == "empty_box"
    assert extract_answer(THINK + "</think>\n\\boxed{8}").reason is None


def test_last_boxed_handles_escaped_braces_and_garbage():
    assert last_boxed("\\boxed{a\\}b}") == "a\\}b"
    assert last_boxed("no boxes at all") is None
    assert last_boxed("\\boxed{" * 1000) is None


#: A model may close its thinking, write a draft, and close again: only what follows the LAST ``</think>`` answers.
TWO_CLOSES = "Think.\n</think>\nDraft: \\boxed{1}.\nOn second thought...\n</think>\n"


def test_extraction_reads_after_the_last_think_close():
    assert extract_answer(TWO_CLOSES + "Final: \\boxed{2}.").answer == "2"
    # a box only between the two closes is a draft: the response has not answered
    assert extract_answer(TWO_CLOSES + "No box in the end.").reason == "no_box"


def test_a_brace_group_after_the_last_box_is_not_the_answer():
    """Only a box's own braces are candidates: an exponent or set written after the box is not the answer."""
    assert last_boxed("\\boxed{12}, since x^{2} + y_{1} = {3}") == "12"
    assert extract_answer("t\n</think>\nSo \\boxed{12}; check: 2^{2} = {4}.").answer == "12"
