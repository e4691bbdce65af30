"""Golden grading tests: realistic answers, worker faults, and the shared benchmarks' own answers."""

import os
import time

import pytest
from repo_paths import SHARED_BENCHMARKS

from freelm.data import load_problems
from freelm.evaluation.extract import extract_answer
from freelm.evaluation.grade import Grade, GraderPool, grade_pairs, normalize_answer, quick_grade

BENCHMARKS = SHARED_BENCHMARKS


@pytest.fixture(scope="module")
def pool():
    with GraderPool(2, timeout_s=30) as p:
        yield p


def respond(final: str) -> str:
    return f"Let me compute.\nTry \\boxed{{0}} first... no.\n</think>\n\nTherefore the answer is {final}."


GOLDEN = [
    # (gold, final text after </think>, correct?)
    ("16", "$\\boxed{016}$", True),
    ("336", "\\boxed{336^\\circ}", True),
    ("336", "\\boxed{336^{\\circ}}", True),
    ("\\frac{3}{2}", "\\boxed{1.5}", True),
    ("\\frac{3}{2}", "\\boxed{\\dfrac{3}{2}}", True),
    ("\\frac{3}{2}", "\\boxed{\\frac{2}{3}}", False),
    ("3\\sqrt{2}", "\\boxed{\\sqrt{18}}", True),
    ("2^{99}", "\\boxed{2^{99}}", True),
    ("2^{99}", "\\boxed{2^{98}}", False),
    ("\\frac{3+i\\sqrt{3}}{2}", "\\boxed{\\frac{3+\\sqrt{3}i}{2}}", True),
    ("2,3", "\\boxed{3, 2}", True),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", True),
    ("(1,2)", "\\boxed{(2,1)}", False),  # ordered pair
    ("\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]", "\\boxed{[\\pi^2/8, 5\\pi^2/4]}", True),
    ("\\text{(C)}", "\\boxed{\\text{(C)}}", True),
    ("\\text{Evelyn}", "\\boxed{\\textbf{Evelyn}}", True),
    ("x^2+1", "\\boxed{1+x^2}", True),
    ("\\pi", "\\boxed{3.14159}", False),  # approximation of an exact answer
    ("70", "\\boxed{71}", False),
    ("70", "no box at all", False),
    ("$Y(x)=A+\\frac{B}{x}-x$", "\\boxed{Y(x) = A + B/x - x}", True),
]


@pytest.mark.parametrize("gold, final, correct", GOLDEN)
def test_golden(pool, gold, final, correct):
    answer = extract_answer(respond(final)).answer
    grade = grade_pairs([(gold, answer)], pool)[(gold, answer)]
    assert grade.correct is correct, grade


def test_normalize_and_quick_path():
    assert normalize_answer(" $016$. ") == "16"
    assert normalize_answer("\\text{ (B) }") == "(B)"
    assert normalize_answer("30^{\\circ}") == "30"
    assert quick_grade("70", "070") == Grade(True, "string", True)
    assert quick_grade("70", "71").method == "integer"
    assert quick_grade("\\frac{1}{2}", "0.5") is None  # needs math-verify


def test_spellings_of_one_answer_normalize_alike_so_they_vote_together():
    """What normalization merges, majority voting counts as one answer and the quick path grades as equal."""
    halves = ("\\frac{1}{2}", "\\dfrac{1}{2}", "\\tfrac{1}{2}", "$\\dfrac{1}{2}$.")
    assert {normalize_answer(a) for a in halves} == {"\\frac{1}{2}"}
    assert quick_grade("\\frac{1}{2}", "\\tfrac{1}{2}") == Grade(True, "string", True)
    assert normalize_answer("\\text{5.}") == "5" and normalize_answer("5.\\,") == "5"  # a period found late
    assert normalize_answer("$X$") == "X" and normalize_answer("2X.") == "2X"  # only "$" and "." go at the ends


def test_dedup_grades_each_distinct_pair_once(pool):
    pairs = [("588", "588"), ("588", "588"), ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "0.5"), ("1", None)]
    grades = grade_pairs(pairs, pool)
    assert len(grades) == 3
    assert grades[("1", None)].method == "unanswered"


# A replacement grader (pickled by reference into the workers) that misbehaves on demand.
def misbehaving_grade(gold: str, answer: str) -> Grade:
    if answer == "hang":
        time.sleep(120)  # no CPU used: only the stall guard ends it
    if answer == "boom":
        raise ZeroDivisionError("scripted")
    if answer == "die":
        os._exit(3)
    return Grade(gold == answer, "scripted", True)


def test_hang_crash_and_death_never_stall():
    with GraderPool(2, timeout_s=1.5, retries=0, grade_fn=misbehaving_grade, stall_s=1.5) as p:
        start = time.monotonic()
        grades = p.map([("1", "hang"), ("1", "boom"), ("1", "1"), ("1", "die"), ("2", "2"), ("1", "2")])
        elapsed = time.monotonic() - start
        assert [g.method for g in grades] == ["timeout", "error", "scripted", "error", "scripted", "scripted"]
        assert [g.correct for g in grades] == [False, False, True, False, True, False]
        assert "ZeroDivisionError" in grades[1].reason and "died" in grades[3].reason
        assert not grades[0].decided and p.restarts == 2
        assert "no CPU progress" in grades[0].reason
        assert elapsed < 60  # bounded by the stall guard, not by the 120 s sleep


def test_workers_that_keep_dying_raise():
    with GraderPool(1, timeout_s=5, grade_fn=misbehaving_grade) as p:
        with pytest.raises(RuntimeError, match="in a row died"):
            p.map([("1", "die")] * 6)


# --------------------------------------------------------------------------- shared benchmarks


def shared_problems():
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmarks not found at {BENCHMARKS} (the repo must sit beside shared/)")
    return {f.stem: load_problems(f) for f in sorted(BENCHMARKS.glob("*.jsonl"))}


def sample(items, full: bool):
    """The default run grades every 10th item (time budget on 2 cores); `-m slow` grades all."""
    return items if full else items[::10]


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_every_ground_truth_verifies_against_itself(full):
    """Through math-verify itself (the string path would make this trivially true)."""
    golds = sorted({p.answer for ps in shared_problems().values() for p in ps})
    golds = sample(golds, full)
    with GraderPool(2, timeout_s=30) as p:
        grades = p.map([(g, g) for g in golds])
    failures = [(g, grade) for g, grade in zip(golds, grades) if not grade.correct]
    assert failures == []


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_other_problems_answers_are_mostly_wrong(pool, full):
    """Each answer vs the next problem's answer in the same file. Full run (1660 pairs): 11 graded
    correct = 0.66%: 9 neighbours with equal answers, "5" vs "x=5", and "2" vs
    "1 if triangle is isoceles, otherwise 2" (math-verify reads a number out of prose)."""
    pairs = []
    for ps in shared_problems().values():
        pairs += [(p.answer, ps[(i + 1) % len(ps)].answer) for i, p in enumerate(ps)]
    pairs = sample(pairs, full)
    grades = grade_pairs(pairs, pool)
    rate = sum(grades[pair].correct and pair[0] != pair[1] for pair in pairs) / len(pairs)
    print(f"cross-problem pairs graded correct (excluding equal strings): {rate:.2%} of {len(pairs)}")
    assert rate < (0.01 if full else 0.02)
