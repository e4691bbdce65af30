"""Two ``</think>`` in one response: the answer (and the cleaner's JSON) is what follows the LAST one.

A model may close its thinking, write a draft, and close again; only the text
after the final ``</think>`` is its answer. Both readers of model output apply
the same rule: the grader's extraction and the cleaner-output parser.
"""

from __future__ import annotations

from freelm.evaluation.extract import extract_answer
from freelm.free import Deletion, format_commands, parse_commands

DRAFT = "Think.\n</think>\nDraft: \\boxed{1}.\nOn second thought...\n</think>\n"


def test_extraction_reads_after_the_last_think_close():
    assert extract_answer(DRAFT + "Final: \\boxed{2}.").answer == "2"
    # a box only between the two closes is a draft: the response has not answered
    assert extract_answer(DRAFT + "No box in the end.").reason == "no_box"


def test_cleaner_parser_reads_after_the_last_think_close():
    draft = format_commands([Deletion("draft", "one")])
    final = format_commands([Deletion("Let me", "again.")])
    raw = f"<think>\nplan\n</think>\n{draft}\nhmm, no\n</think>\n{final}"
    assert parse_commands(raw) == [Deletion("Let me", "again.")]
    # nothing after the last close: no list at all (the draft is not taken)
    assert parse_commands(f"<think>\n</think>\n{draft}\n</think>\nnothing").error == "no_json_list"
