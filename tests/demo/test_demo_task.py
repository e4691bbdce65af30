"""The counter task and its oracle: determinism, answers by construction, deletions that always resolve."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freelm.cleaners.oracle import OracleCleaner, oracle_deletions, oracle_output
from freelm.demo.task import continuation, generate_problems, held_out, parse_problem, solution
from freelm.free import apply_deletions, parse_commands


def test_generator_is_deterministic_and_seed_dependent():
    assert generate_problems(20, seed=3) == generate_problems(20, seed=3)
    assert generate_problems(20, seed=3) != generate_problems(20, seed=4)
    ids = [p.id for p in generate_problems(50, seed=3)]
    assert len(set(ids)) == 50


def test_train_and_test_splits_never_share_a_problem():
    train = {(p.start, p.turns) for p in generate_problems(4000, seed=2, split="train")}
    test = {(p.start, p.turns) for p in generate_problems(100, seed=2024, split="test")}
    assert not train & test
    assert all(held_out(*pair) for pair in test) and len(test) > 50
    assert len(train) > 800  # training still covers most of the 1,100 pairs
    assert [p.id for p in generate_problems(3, seed=5, split="test")] == [
        "counter-5-0000",
        "counter-5-0001",
        "counter-5-0002",
    ]
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, seed=0, split="dev")


def test_rows_are_in_the_evaluation_format_and_answers_follow_the_rule():
    for p in generate_problems(50, seed=0, min_turns=5, max_turns=12):
        row = p.to_row()
        assert set(row) == {"id", "source", "prompt", "answer"}
        value = p.start
        for _ in range(p.turns):  # simulate the turns one by one, independently of CounterProblem.state
            value = (value + 37) % 100
        assert row["answer"] == str(value)
        assert parse_problem(row["prompt"]).turns == p.turns
        assert solution(p).endswith(f"\\boxed{{ {value}}}")


def test_solution_has_one_line_per_turn_and_grades_with_math_verify():
    from math_verify import parse, verify

    p = generate_problems(1, seed=7, min_turns=9, max_turns=9)[0]
    thinking, after = solution(p).split("</think>")
    assert thinking.splitlines()[0] == f"#9 {p.start}"
    assert thinking.splitlines()[-1] == f"#0 {p.answer}"
    assert len(thinking.splitlines()) == 10
    assert verify(parse(p.to_row()["answer"]), parse(after))


def test_parse_problem_rejects_other_text():
    with pytest.raises(ValueError, match="not a counter problem"):
        parse_problem("What is 2 + 2?")


def test_nothing_to_delete_before_two_complete_lines():
    text = solution(generate_problems(1, seed=1)[0])
    assert oracle_deletions("") == []
    assert oracle_deletions(text[:5]) == []
    first_line = text[: text.index("\n") + 1]
    assert oracle_output(first_line + "#1 ") == "[]"


def test_continuation_fails_when_the_state_was_deleted():
    p = generate_problems(1, seed=1)[0]
    with pytest.raises(ValueError, match="state it needs is lost"):
        continuation(p, "#5 ")
    lines = solution(p).splitlines(keepends=True)
    with pytest.raises(ValueError, match="state it needs is lost"):  # the line of turn 1 deleted
        continuation(p, lines[0] + lines[2][:3])


@st.composite
def cleaning_rounds(draw):
    """A problem, and the thinking as the loop would see it after several oracle rounds at random points."""
    p = draw(st.sampled_from(generate_problems(30, seed=11, min_turns=3, max_turns=25)))
    full = solution(p)
    end = full.index("</think>")
    cuts = sorted(draw(st.lists(st.integers(1, end), min_size=1, max_size=5)))
    return p, full, cuts


@settings(max_examples=100, deadline=None)
@given(cleaning_rounds())
def test_oracle_deletions_resolve_and_keep_what_the_solution_needs(case):
    p, full, cuts = case
    kept, consumed = "", 0  # consumed: how much of the full solution has been generated
    for cut in cuts:
        thinking = kept + full[consumed:cut]
        consumed = cut
        raw = oracle_output(thinking)
        commands = parse_commands(raw)
        assert commands.error is None
        edit = apply_deletions(thinking, commands)
        assert not edit.skipped, edit.skipped
        assert bool(commands) == (thinking.count("\n") >= 2)  # deletes whenever an obsolete line exists
        if commands:
            assert edit.spans[0][0] == 0  # one span from the first line ...
            assert edit.text.count("\n") == 1  # ... up to the last complete line, which is kept
        kept = edit.text
        assert continuation(p, kept) == full[consumed:]


def test_oracle_cleaner_keeps_the_last_complete_line_and_reports_its_command():
    p = generate_problems(1, seed=4, min_turns=12, max_turns=12)[0]
    thinking = solution(p)[:40]  # several complete lines, then a partial one
    outcome = asyncio.run(OracleCleaner().clean(p.prompt, thinking))
    assert outcome.raw_output == oracle_output(thinking)
    assert len(outcome.edit.applied) == 1 and not outcome.edit.skipped
    kept = outcome.edit.text
    assert kept.count("\n") == 1 and thinking.endswith(kept)  # one complete line + the partial one
    assert kept + continuation(p, kept) == solution(p)[len(thinking) - len(kept) :]
