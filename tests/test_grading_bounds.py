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
from freelm.evaluation.grade import MAX_ANSWER_CHARS, GraderPool, grade_pairs, normalize_answer, quick_grade

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


def test_eval_finishes_on_adversarial_answers_and_counts_them(tmp_path):
    lines = []
    finals = {**ADVERSARIAL, "plain": "\\boxed{7}"}
    for i, (name, final) in enumerate(sorted(finals.items())):
        lines.append({
            "id": name, "source": "adv", "rollout": 0, "seed": i, "answer": "7", "mode": "freelm", "config_hash": "h",
            "response": response(final), "finish_reason": "stop", "prompt_tokens": 1, "generated_tokens": 1,
            "final_context_tokens": 2, "peak_context_tokens": 2, "cleaning_rounds": 0, "wall_time_s": 0.0,
            "reasoning_time_s": 0.0, "cleaning_time_s": 0.0,
        })  # fmt: skip
    run = tmp_path / "adv.jsonl"
    run.write_text("".join(json.dumps(line) + "\n" for line in lines))
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--input", str(run), "--output", str(tmp_path / "metrics.json"), "--grade-timeout", "1", "--no-progress"]
    )
    started = time.perf_counter()
    assert eval_cli.run(args) == 0
    assert time.perf_counter() - started < 120  # each answer is bounded (1 + 4 CPU s); before: over an hour
    overall = json.loads((tmp_path / "metrics.json").read_text())["runs"][0]["overall"]
    assert overall["rollouts"] == 6
    # nested_16000 (32,001 chars) and one_mb_box exceed the size bound; digits_5000 is an integer (textually);
    # nested_1000 (2,001 chars) is math-verify's (in a worker, under the deadline); boxes_1mb has no complete box
    assert overall["grade_methods"]["too_long"] == 2 and overall["grade_methods"]["integer"] == 1
    assert overall["over_bounds"] >= 2
    assert overall["unanswered_reasons"] == {"no_box": 1}
    assert overall["avg_at_n"] == pytest.approx(1 / 6)  # only "plain" is correct
