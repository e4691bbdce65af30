"""The executor on hostile cleaner output: never raises, time linear in the input, bounds that skip with a reason.

The time bound is deliberately loose (a fixed allowance plus a per-character
budget far above the measured ~3 us/char), so only a super-linear regression
(the old decoder retried at every ``[``: 4.7 s for one 37 KB answer) fails it.
"""

from __future__ import annotations

import asyncio
import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freelm.backends.base import GenerateRequest, GenerateResult
from freelm.backends.pool import EndpointPool
from freelm.cleaners import FreeModuleCleaner
from freelm.data import Problem
from freelm.free import MAX_COMMANDS, MAX_DEPTH, MAX_NOTES, Deletion, apply_deletions, format_commands, parse_commands
from freelm.records import read_rollouts
from freelm.run.batch import run_batch
from freelm.run.components import Components
from freelm.run.spec import RunSpec
from freelm.testing.counting import CountingBackend, counting_tokenizer

GOOD = [Deletion("Let me try", "dead end.")]
BODY = format_commands(GOOD)
THINKING = "Plan.\nLet me try x = 3: a dead end.\nSo x = 4.\n"


def budget_s(raw: str) -> float:
    return 1.0 + 20e-6 * len(raw)


def timed_parse(raw: str):
    started = time.perf_counter()
    parsed = parse_commands(raw)
    edit = apply_deletions(THINKING, parsed)
    elapsed = time.perf_counter() - started
    assert elapsed < budget_s(raw), f"{elapsed:.2f}s for {len(raw)} chars"
    assert all(isinstance(d, Deletion) for d in parsed)
    assert len(edit.text) <= len(THINKING)
    return parsed


JSONISH = st.sampled_from(["[", "]", "{", "}", '"', "\\", ",", ":", " ", "\n", "1", "e9", "x", '"prefix"', '"suffix"'])
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(st.text(max_size=2000))
def test_arbitrary_text(raw):
    timed_parse(raw)


@SLOW
@given(st.lists(JSONISH, max_size=400), st.integers(1, 200))
def test_adversarial_json_tokens_repeated(tokens, repeat):
    timed_parse("".join(tokens) * repeat)


@SLOW
@given(
    st.sampled_from(["[", "{", '{"a":', "[{", '["', "[1,", '{"prefix":']),
    st.integers(1, 20_000),
    st.sampled_from(["", "]", "}", "]}", BODY, "```json\n" + BODY + "\n```"]),
    st.integers(0, 20_000),
)
def test_deep_nesting_and_long_repeats(opener, depth, tail, closers):
    timed_parse(opener * depth + tail + "]" * closers)


def test_a_thousand_brackets_do_not_raise():
    for raw in ["[" * 1000, "{" * 1000, "[" * 3000 + "]" * 3000, '{"a":' * 5000, "[{" * 4000]:
        parsed = timed_parse(raw)
        assert parsed == []


def test_nesting_beyond_the_bound_is_skipped_with_a_reason():
    # the innermost MAX_DEPTH levels still decode (their items, not objects, are dropped)
    parsed = parse_commands("[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5))
    assert parsed == [] and parsed.dropped == ["nesting_too_deep", "item 0: not an object"]
    parsed = parse_commands("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert parsed.error is None and parsed.dropped == ["item 0: not an object"]
    assert parse_commands("[" * (MAX_DEPTH + 5) + "1 x" + "]" * (MAX_DEPTH + 5)).error == "nesting_too_deep"


def test_a_list_after_unclosed_junk_is_still_found():
    assert parse_commands("[" * 50_000 + BODY) == GOOD
    assert parse_commands("[1, 2, oops " + BODY) == GOOD
    assert parse_commands("[see " + BODY + " above]") == GOOD  # a valid list nested in a broken one


def test_brackets_inside_strings_do_not_count():
    cmds = [Deletion("f(x) = [", "} done"), Deletion('say "[{', ']"')]
    assert parse_commands("noise [ " + format_commands(cmds)) == cmds


def test_a_huge_integer_is_a_dropped_value_not_a_crash():
    assert parse_commands("[" + "9" * 5000 + "] " + BODY) == GOOD


def test_commands_beyond_the_cap_are_dropped_with_a_note():
    raw = format_commands([Deletion(f"p{i}", "s") for i in range(MAX_COMMANDS + 10)])
    parsed = timed_parse(raw)
    assert len(parsed) == MAX_COMMANDS
    assert parsed.dropped == [f"too_many_commands: kept the first {MAX_COMMANDS} of {MAX_COMMANDS + 10}"]


def test_notes_about_malformed_items_are_capped_and_the_rest_counted():
    """10,000 bad items in one answer: MAX_NOTES notes and one count, not a note each (they reach every record)."""
    raw = json.dumps([{"prefix": "p", "suffix": "s"}] * 300 + [1] * 9_000 + [{"prefix": 1}] * 700)
    parsed = timed_parse(raw)
    assert len(parsed) == MAX_COMMANDS
    assert parsed.dropped[:MAX_NOTES] == [f"item {i}: not an object" for i in range(300, 300 + MAX_NOTES)]
    assert parsed.dropped[MAX_NOTES:] == [
        f"{9_700 - MAX_NOTES} more items dropped (not an object: {9_000 - MAX_NOTES}, "
        "needs string 'prefix' and 'suffix': 700)",
        f"too_many_commands: kept the first {MAX_COMMANDS} of 300",
    ]


def _marked(n: int) -> tuple[str, list[Deletion]]:
    """A thinking of ``n`` marked lines and one command per line deleting it."""
    lines = [f"<{i:04d}> note {i}.\n" for i in range(n)]
    return "".join(lines), [Deletion(f"<{i:04d}>", f"note {i}.\n") for i in range(n)]


def test_exactly_the_cap_is_applied_whole_and_one_more_applies_the_first_ones():
    thinking, commands = _marked(MAX_COMMANDS + 1)
    parsed = parse_commands(format_commands(commands[:MAX_COMMANDS]))
    assert parsed == commands[:MAX_COMMANDS] and parsed.dropped == [] and parsed.error is None
    parsed = parse_commands("Deleting:\n" + format_commands(commands))
    assert parsed.dropped == [f"too_many_commands: kept the first {MAX_COMMANDS} of {MAX_COMMANDS + 1}"]
    edit = apply_deletions(thinking, parsed)
    assert edit.text == f"<{MAX_COMMANDS:04d}> note {MAX_COMMANDS}.\n"  # the last line is the one left
    assert edit.applied == commands[:MAX_COMMANDS] and edit.skipped == []


def test_the_cap_counts_commands_not_malformed_items():
    _, commands = _marked(MAX_COMMANDS)
    items = [{"prefix": 1, "suffix": "x"}, *(c.to_dict() for c in commands), "junk"]
    parsed = parse_commands(json.dumps(items))
    assert parsed == commands
    assert parsed.dropped == ["item 0: needs string 'prefix' and 'suffix'", f"item {MAX_COMMANDS + 1}: not an object"]


def _padded(depth: int, in_list: bool = True) -> str:
    """The GOOD command nested ``depth`` brackets deep in all: its object carries a ``pad`` nested the rest of the way.

    In a list the pad is lists; a single object's pad is objects (a list inside it would be read as the list).
    """
    inner = depth - (2 if in_list else 1)  # the list (if any) and the command's object are levels too
    pad = "[" * inner + "]" * inner if in_list else '{"a": ' * inner + "0" + "}" * inner
    command = '{"prefix": "Let me try", "suffix": "dead end.", "pad": ' + pad + "}"
    return f"[{command}]" if in_list else command


def test_exactly_the_deepest_nesting_decodes_and_one_level_more_is_skipped():
    for depth in (MAX_DEPTH - 1, MAX_DEPTH):
        parsed = parse_commands(_padded(depth))
        assert parsed == GOOD and parsed.dropped == [] and parsed.error is None
        assert apply_deletions(THINKING, parsed).text == "Plan.\n\nSo x = 4.\n"
    parsed = parse_commands(_padded(MAX_DEPTH + 1))
    assert parsed == [] and parsed.dropped[0] == "nesting_too_deep"
    assert apply_deletions(THINKING, parsed).text == THINKING


def test_a_single_object_at_the_deepest_nesting_decodes_one_level_more_does_not():
    assert parse_commands(_padded(MAX_DEPTH, in_list=False)) == GOOD
    deeper = parse_commands(_padded(MAX_DEPTH + 1, in_list=False))
    assert deeper == [] and "nesting_too_deep" in [deeper.error, *deeper.dropped]


# --------------------------------------------------------------------------- end to end


class BracketCleanerBackend(CountingBackend):
    """The counting model whose Free-Module degenerates into 3,000 brackets on every call (greedy: every re-run)."""

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if request.adapter is None:
            return await super().generate(request)
        self.clean_calls += 1
        return GenerateResult(text="[" * 3000, output_ids=[], finish_reason="length", prompt_tokens=1,
                              completion_tokens=3000)  # fmt: skip


class ExplodingCleaner:
    """A cleaner with a bug: any exception must cost the round, never the rollout."""

    name = "exploding"

    async def clean(self, problem: str, thinking: str):
        raise ZeroDivisionError("cleaner bug")


def _run(tmp_path, backend, cleaner_for):
    tokenizer = backend.tokenizer
    spec = RunSpec.from_argv(
        ["--data", "x.jsonl", "--output", str(tmp_path / "out.jsonl"), "--clean-every", "20", "--context-limit", "400",
         "--max-tokens", "600", "--n-rollouts", "2", "--concurrency", "4", "--no-progress"]
    )  # fmt: skip
    pool = EndpointPool([backend], remote=False, probe_interval=0.01)
    problems = [Problem(id=str(i), source="count", prompt=f"Count to 30, puzzle {i}.", answer="30") for i in range(3)]
    components = Components(reasoner=pool, tokenizer=tokenizer, cleaner=cleaner_for(pool), pools=(pool,))

    async def go():
        try:
            return await run_batch(problems, spec, components)
        finally:
            await pool.aclose()

    return asyncio.run(go()), read_rollouts(tmp_path / "out.jsonl")


def test_a_cleaner_answering_3000_brackets_keeps_every_rollout(tmp_path):
    backend = BracketCleanerBackend(counting_tokenizer(30), target=30)
    summary, records = _run(tmp_path, backend, FreeModuleCleaner)
    assert summary.done == 6 and summary.failed == 0 and len(records) == 6
    assert all(r.finish_reason == "stop" for r in records)
    cleans = [rnd.clean for r in records for rnd in r.rounds if rnd.clean is not None]
    assert cleans and backend.clean_calls == len(cleans)
    assert all(c.error is None and c.applied == 0 and c.parse_error == "no_json_list" for c in cleans)


def test_any_exception_from_a_cleaner_is_a_failed_round_with_its_error(tmp_path):
    backend = CountingBackend(counting_tokenizer(30), target=30)
    summary, records = _run(tmp_path, backend, lambda pool: ExplodingCleaner())
    assert summary.done == 6 and summary.failed == 0
    cleans = [rnd.clean for r in records for rnd in r.rounds if rnd.clean is not None]
    assert cleans and all(c.error == "ZeroDivisionError: cleaner bug" for c in cleans)
