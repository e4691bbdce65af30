"""Grading whose verdict cannot change with machine load: CPU-time budgets, timeouts reported and retried.

Before: math-verify's own ``signal.alarm`` timeouts (5 s of wall clock) made
``parse`` return ``[]`` and ``verify`` return ``False`` when a loaded machine
stretched an answer past them, so a right answer was graded "not equivalent"
(in one of nine loaded runs of 40 fixed answers, pass@1 60% -> 50%).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from repo_paths import EVAL_FIXTURES

from freelm.evaluation.extract import extract_answer
from freelm.evaluation.grade import Grade, GraderPool, grade_pairs

FIXTURE = EVAL_FIXTURES / "grading40.jsonl"


def spin_grade(gold: str, answer: str) -> Grade:
    """Uses ``answer`` seconds of CPU, then says correct: the same work whatever the load."""
    until = time.process_time() + float(answer)
    while time.process_time() < until:
        pass
    return Grade(True, "scripted", True)


def test_a_pair_over_its_budget_is_a_timeout_never_wrong():
    with GraderPool(1, timeout_s=0.02, retries=1, grade_fn=spin_grade) as pool:
        [grade] = pool.map([("x", "5")])
    assert (grade.method, grade.correct, grade.decided) == ("timeout", False, False)
    assert "CPU budget" in grade.reason and "0.02, 0.08" in grade.reason  # both attempts named
    assert pool.retried == 1


def test_a_timeout_is_retried_with_a_larger_budget():
    # 0.2 s of CPU: over 0.02 and 0.08, within 0.32 (4x per retry)
    with GraderPool(1, timeout_s=0.02, retries=3, grade_fn=spin_grade) as pool:
        [grade] = pool.map([("x", "0.2")])
    assert grade == Grade(True, "scripted", True)
    assert pool.retried == 2


def test_math_verify_under_a_tiny_budget_times_out_instead_of_grading_wrong():
    pair = ("1-\\frac{3}{\\pi}", "\\frac{\\pi-3}{\\pi}")  # equal; about 0.06 s of CPU
    with GraderPool(1, timeout_s=0.0005, retries=0) as pool:
        [starved] = pool.map([pair])
    assert starved.method == "timeout" and not starved.decided  # before: "answer not parseable" or "not equivalent"
    with GraderPool(1, timeout_s=0.0005, retries=8) as pool:
        [graded] = pool.map([pair])
    assert graded == Grade(True, "math_verify", True) and pool.retried >= 1


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the worker's CPU clock")
def test_a_worker_starved_of_cpu_for_longer_than_math_verifys_alarm_still_grades_right():
    """The worker is stopped (SIGSTOP) for 6 s in the middle of math-verify: a machine so loaded that it got no CPU.
    Before, math-verify's 5 s alarm fired on resume and the right answer was graded wrong."""
    gold, answer = "\\frac{\\pi^2}{6}", "\\sum_{n=1}^{\\infty}\\frac{1}{n^2}"  # equal; about 1.4 s of CPU in verify
    with GraderPool(1, timeout_s=30) as pool:
        pool.map([("1", "1")])  # the worker is up
        pid = pool._workers[0].process.pid
        result: dict[str, Grade] = {}
        before = _cpu_ticks(pid)
        thread = threading.Thread(target=lambda: result.update(grade=pool.map([(gold, answer)])[0]))
        thread.start()
        deadline = time.monotonic() + 60
        while _cpu_ticks(pid) < before + 10 and time.monotonic() < deadline:  # 0.1 s of CPU in: inside math-verify
            time.sleep(0.005)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(6)
        os.kill(pid, signal.SIGCONT)
        thread.join(120)
    assert result["grade"] == Grade(True, "math_verify", True)


def test_the_forty_answer_fixture_grades_as_expected():
    """The fixture ``bench/grade_load_bench.py`` grades 20 times under load (HMMT-style answers, 24 of 40 right)."""
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    pairs = [(row["answer"], extract_answer(row["response"]).answer) for row in rows]
    with GraderPool(2) as pool:
        grades = grade_pairs(pairs, pool)
    assert len(rows) == 40 and sum(row["expected_correct"] for row in rows) == 24
    assert [grades[pair].correct for pair in pairs] == [row["expected_correct"] for row in rows]
    assert {grades[pair].method for pair in pairs} == {"math_verify"}  # none settled by the string quick path
