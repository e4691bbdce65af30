"""Adversarial answers: extraction is linear, every per-answer step is bounded, and the report counts the bounded ones.

Before: 16,000 nested braces took 65 s to extract (in the main process, outside
the grading deadline), 1 MB well over an hour, and a 5,000-digit integer
aborted the whole evaluation (``str(int(s))`` past Python's 4,300-digit limit).
"""

from __future__ import annotations

import argparse
import json
import time

import pytest

from freelm.evaluation import eval_cli
from freelm.evaluation.extract import extract_answer, last_boxed
from freelm.evaluation.grade import MAX_ANSWER_CHARS, Grade, GraderPool, grade_pairs, normalize_answer, quick_grade

BIG = "9" * 5000


def nested(levels: int) -> str:
    return "\\boxed{" + "{" * levels + "7" + "}" * levels + "}"


ADVERSARIAL = {
    "nested_1000": nested(1000),
    "nested_16000": nested(16_000),
    "boxes_1mb": "\\boxed{" * 150_000,
    "one_mb_box": "\\boxed{" + "x" * 1_000_000 + "}",
    "digits_5000": "\\boxed{" + BIG + "}",
}


def response(final: str) -> str:
    return "Let me think.\n</think>\n\nThe answer is " + final


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_extraction_is_linear(name):
    text = response(ADVERSARIAL[name])
    started = time.perf_counter()
    extract_answer(text)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0 + 20e-6 * len(text), f"{elapsed:.2f}s for {len(text)} chars"  # loose: catches quadratic


def test_extraction_semantics_on_deep_nesting():
    assert last_boxed(nested(16_000)) == "{" * 16_000 + "7" + "}" * 16_000
    assert last_boxed("\\boxed{" * 1000 + "\\boxed{3}") == "3"


def test_integers_beyond_pythons_digit_limit_are_handled_textually():
    assert normalize_answer("-000" + BIG) == "-" + BIG
    assert normalize_answer("+0") == "0" and normalize_answer("-0") == "0" and normalize_answer("0042") == "42"
    assert quick_grade(BIG, "00" + BIG).correct
    assert quick_grade(BIG, BIG[:-1] + "8").method == "integer"


def test_answers_over_the_size_bound_are_incorrect_with_a_reason():
    with GraderPool(1) as pool:
        long_answer = "x" * (MAX_ANSWER_CHARS + 1)
        grade = grade_pairs([("5", long_answer)], pool)[("5", long_answer)]
    assert not grade.correct and grade.method == "too_long" and str(MAX_ANSWER_CHARS) in grade.reason
    assert normalize_answer(long_answer) == long_answer  # not even normalized


def _rollout(name: str, final: str, index: int = 0) -> dict:
    return {
        "id": name, "source": "adv", "rollout": 0, "seed": index, "answer": "7", "mode": "freelm", "config_hash": "h",
        "response": response(final), "finish_reason": "stop", "prompt_tokens": 1, "generated_tokens": 1,
        "final_context_tokens": 2, "peak_context_tokens": 2, "cleaning_rounds": 0, "wall_time_s": 0.0,
        "reasoning_time_s": 0.0, "cleaning_time_s": 0.0,
    }  # fmt: skip


def _eval_args(tmp_path, lines: list[dict], *flags: str) -> argparse.Namespace:
    """``eval_passk.py``'s arguments for a run of these rollouts; metrics go to ``tmp_path / "metrics.json"``."""
    run = tmp_path / "adv.jsonl"
    run.write_text("".join(json.dumps(line) + "\n" for line in lines))
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    return parser.parse_args(["--input", str(run), "--output", str(tmp_path / "metrics.json"), "--no-progress", *flags])


def _overall(tmp_path) -> dict:
    return json.loads((tmp_path / "metrics.json").read_text())["runs"][0]["overall"]


#: Seven written with leading zeros to exactly the length limit, and with one zero more.
AT_LIMIT = "0" * (MAX_ANSWER_CHARS - 1) + "7"
OVER_LIMIT = "0" + AT_LIMIT


def test_an_answer_of_exactly_the_length_limit_is_graded_one_character_more_is_too_long():
    assert normalize_answer(AT_LIMIT) == "7" and normalize_answer(OVER_LIMIT) == OVER_LIMIT
    with GraderPool(1) as pool:
        grades = grade_pairs([("7", AT_LIMIT), ("7", OVER_LIMIT), ("7", AT_LIMIT[:-1] + "8")], pool)
    assert grades[("7", AT_LIMIT)] == Grade(True, "string", True)
    assert grades[("7", AT_LIMIT[:-1] + "8")] == Grade(False, "integer", True)
    reason = f"answer of {MAX_ANSWER_CHARS + 1} chars > {MAX_ANSWER_CHARS}"
    assert grades[("7", OVER_LIMIT)] == Grade(False, "too_long", True, reason)  # decided: no judge is asked


def test_evaluation_grades_a_boxed_answer_at_the_limit_and_counts_one_over_it(tmp_path):
    lines = [_rollout("at", f"\\boxed{{{AT_LIMIT}}}"), _rollout("over", f"\\boxed{{{OVER_LIMIT}}}", 1)]
    assert eval_cli.run(_eval_args(tmp_path, lines)) == 0
    overall = _overall(tmp_path)
    assert overall["grade_methods"] == {"string": 1, "too_long": 1} and overall["over_bounds"] == 1
    assert overall["avg_at_n"] == pytest.approx(1 / 2)


def test_eval_finishes_on_adversarial_answers_and_counts_them(tmp_path):
    finals = {**ADVERSARIAL, "plain": "\\boxed{7}"}
    lines = [_rollout(name, final, i) for i, (name, final) in enumerate(sorted(finals.items()))]
    args = _eval_args(tmp_path, lines, "--grade-timeout", "1")
    started = time.perf_counter()
    assert eval_cli.run(args) == 0
    assert time.perf_counter() - started < 120  # each answer is bounded (1 + 4 CPU s); before: over an hour
    overall = _overall(tmp_path)
    assert overall["rollouts"] == 6
    # nested_16000 (32,001 chars) and one_mb_box exceed the size bound; digits_5000 is an integer (textually);
    # nested_1000 (2,001 chars) is math-verify's (in a worker, under the deadline); boxes_1mb has no complete box
    assert overall["grade_methods"]["too_long"] == 2 and overall["grade_methods"]["integer"] == 1
    assert overall["over_bounds"] >= 2
    assert overall["unanswered_reasons"] == {"no_box": 1}
    assert overall["avg_at_n"] == pytest.approx(1 / 6)  # only "plain" is correct
