"""The cleaning-outcome rule: every round counted by outcome, and a Free()LM run whose cleaner (nearly) never gives a
usable deletion list exits 3 with one message naming the dominant reason, its likely cause and how to check it."""

from __future__ import annotations

import asyncio
import json

import pytest

from freelm.backends.base import BackendError, ContextLengthError, TransientBackendError
from freelm.data import Problem
from freelm.manifest import read_manifest
from freelm.records import CleanRecord, RoundRecord, read_rollouts
from freelm.run.cleaning import (
    DEFAULT_MAX_UNUSABLE,
    EXIT_CLEANING,
    OUTCOMES,
    CleaningRule,
    CleaningTally,
    describe_cleaner,
    failure_reason,
    flag_message,
    round_outcome,
)
from freelm.run.cli import _run_async
from freelm.run.components import build_components
from freelm.run.plan import inspect_output
from freelm.run.spec import RunSpec
from freelm.testing.engines import ScriptedEngine, ScriptedTokenizer
from freelm.testing.sglang_server import SGLangTestServer
from freelm.tokenizer import Tokenizer

# --------------------------------------------------------------------------- what a round produced


def clean(**fields) -> CleanRecord:
    return CleanRecord(cleaner="free", context_tokens_before=100, context_tokens_after=100, **fields)


def rounds(*cleans: CleanRecord | None) -> list[RoundRecord]:
    return [
        RoundRecord(
            index=i, generated_text="x", generated_tokens=1, prompt_tokens=1, context_tokens=1, reused_tokens=0,
            cached_tokens=None, finish_reason="length", latency_s=0.0, clean=c,
        )
        for i, c in enumerate(cleans)
    ]  # fmt: skip


SKIP = {"prefix": "a", "suffix": "b", "reason": "prefix_not_found"}


def test_each_round_is_one_outcome_and_the_examples_name_where():
    tally = CleaningTally()
    every = rounds(
        clean(applied=1, deleted_spans=[(0, 3)], skipped=[SKIP]),  # applied, one of its commands skipped
        clean(raw_output="[]"),  # a valid empty list
        clean(skipped=[SKIP, SKIP], raw_output='[{"prefix": "a", ...'),  # every command rejected
        clean(parse_error="no_json_list", raw_output="Sure! Here is"),
        clean(parse_error="not_text: int"),
        clean(error="http://h:1/generate: HTTP 400: Got LoRA adapter that has never been loaded: free"),
        clean(no_room="cleaning prompt of 900 tokens leaves no room"),
        None,  # a round without cleaning (the last one) is not a cleaning round
    )
    assert [round_outcome(r.clean)[0] for r in every[:-1]] == [
        "applied", "nothing_to_delete", "unresolved", "parse_error", "parse_error", "failed", "no_room",
    ] and set(OUTCOMES) == {round_outcome(r.clean)[0] for r in every[:-1]}  # fmt: skip
    tally.add(("aime25", "7", 2), every)
    assert (tally.rounds, tally.calls, tally.applied, tally.nothing_to_delete) == (7, 6, 1, 1)
    assert (tally.unresolved, tally.no_room, tally.skipped_commands) == (1, 1, 3)
    assert tally.parse_errors == {"no_json_list": 1, "not_text": 1}
    assert tally.failed == {"unknown_adapter": 1}
    assert tally.usable == 2 and tally.unusable == 5
    assert tally.examples["parse_error:no_json_list"] == {
        "source": "aime25", "id": "7", "rollout": 2, "round": 3, "said": "Sure! Here is",
    }  # fmt: skip
    assert tally.examples["no_room"]["round"] == 6 and "applied" not in tally.examples
    assert list(tally.reasons()) == [
        "failed:unknown_adapter",
        "no_room",
        "parse_error:no_json_list",
        "parse_error:not_text",
        "unresolved",
    ]  # fmt: skip (ties by name)


def test_tallies_merge_and_a_long_answer_is_cut_in_the_example():
    one, two = CleaningTally(), CleaningTally()
    one.add(("s", "1", 0), rounds(clean(parse_error="no_json_list", raw_output="y" * 500), clean(applied=2)))
    two.add(("s", "2", 0), rounds(clean(parse_error="no_json_list", raw_output="z"), clean(error="timeout")))
    both = one.merged(two)
    assert (both.rounds, both.applied, both.parse_errors, both.failed) == (4, 1, {"no_json_list": 2}, {"timeout": 1})
    assert both.examples["parse_error:no_json_list"]["id"] == "1"  # the earlier tally's example is kept
    assert both.examples["parse_error:no_json_list"]["said"] == "y" * 160 + "..."
    assert json.loads(json.dumps(both.to_dict()))["unusable"] == 3


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        # SGLang managers/tokenizer_manager.py (the stand-in's wording) and vLLM's OpenAI server, through each backend
        ("http://h:1/generate: HTTP 400: Got LoRA adapter that has never been loaded: free\nAll loaded", "unknown_adapter"),
        ("http://h:1/v1: NotFoundError HTTP 404: The model `free` does not exist.", "unknown_adapter"),
        ("adapter 'frees' is not loaded (loaded: ['free'])", "unknown_adapter"),  # the in-process engine
        ("http://h:1/generate: HTTP 400: Input length (900 tokens) exceeds the maximum allowed length (505 tokens).",
         "context"),
        ("http://h:1/v1: BadRequestError HTTP 400: This model's maximum context length is 1024 tokens", "context"),
        ("http://h:1/generate: HTTP 422: bad sampling params", "http_422"),
        ("reasoner: gave up after 9 failed attempts; last: http://h:1/generate: failed after 1 attempts: timeout "
         "(ServerTimeoutError)", "timeout"),
        ("reasoner: gave up after 3 failed attempts; last: h:1: no answer within 6.0s (3x ...): presumed hung", "timeout"),
        ("reasoner: gave up after 9 failed attempts; last: http://h:1/generate: failed after 1 attempts: HTTP 503: busy",
         "server_error"),
        ("http://h:1/generate: failed after 1 attempts: connection error (ClientConnectorError: refused)", "connection"),
        ("reasoner: no healthy endpoint for 600s (h:1: down)", "connection"),
        ("http://h:1/generate: malformed /generate response (no meta_info): {}", "malformed_reply"),
        ("KeyError: 'prefix'", "other"),
    ],
)  # fmt: skip
def test_a_failed_call_is_counted_by_its_reason(error, reason):
    assert failure_reason(error) == reason


def test_the_backends_own_errors_classify_as_their_kind():
    """The exception types the loop records (their text is what a record keeps) land in the matching reason."""
    from freelm.backends.base import refused

    window = refused("h:1/generate: HTTP 400: Input length (9 tokens) exceeds the maximum allowed length (5)",
                     "Input length (9 tokens) exceeds the maximum allowed length (5 tokens)")  # fmt: skip
    assert isinstance(window, ContextLengthError) and failure_reason(str(window)) == "context"
    assert failure_reason(str(TransientBackendError("h:1: failed after 1 attempts: timeout (TimeoutError)"))) == (
        "timeout"
    )
    assert failure_reason(str(BackendError("h:1: unexpected finish_reason {'type': 'x'}"))) == "other"


# --------------------------------------------------------------------------- the verdict and its message


@pytest.mark.parametrize(
    ("unusable", "rounds_", "verdict"),
    [
        (0, 0, "no_cleaning"),
        (8, 536, "ok"),  # the embedded default at the demo's settings
        (2, 27, "ok"),  # 7.4%, but a small run: its 95% lower bound is 2.1%
        (10, 100, "flagged"),  # lower bound 5.5%
        (6, 100, "ok"),  # lower bound 2.8%
        (4, 4, "flagged"),  # a cleaner that never works is flagged after a handful
        (1, 1, "flagged"),
        (464, 734, "flagged"),  # the ICL baseline of the demo
    ],
)
def test_the_rule_flags_beyond_sampling_noise(unusable, rounds_, verdict):
    tally = CleaningTally(rounds=rounds_, applied=rounds_ - unusable, unresolved=unusable)
    assert CleaningRule().verdict(tally) == verdict
    accepted = CleaningRule(accept=True).verdict(tally)
    assert accepted == ("accepted" if verdict == "flagged" else verdict)
    assert CleaningRule(max_unusable=0.99).verdict(tally) in ("ok", "no_cleaning")


def test_the_default_limit_is_a_few_percent():
    assert 0.02 <= DEFAULT_MAX_UNUSABLE <= 0.1


def test_the_message_names_the_reason_the_template_and_how_to_check(tmp_path):
    from freelm.cleaners.prompted import template_digest
    from freelm.prompts import DEFAULT_CLEAN_TEMPLATE

    tally = CleaningTally()
    tally.add(("counter", "c-3", 0), rounds(*[clean(parse_error="no_json_list", raw_output="#44 23")] * 6))
    copy = tmp_path / "mine.txt"
    copy.write_text(DEFAULT_CLEAN_TEMPLATE.read_text())
    settings = {"name": "free", "adapter": "free", "template_sha256": template_digest(None, {})}
    cleaner = describe_cleaner("free", settings, copy)
    assert (
        cleaner
        == f"'free', adapter 'free', template {copy} (the project's default), sha256 "
        + (settings["template_sha256"][:12])
    )
    message = flag_message(tally, CleaningRule(), output=tmp_path / "out.jsonl", cleaner=cleaner)
    first, *rest = message.splitlines()
    assert first.startswith("cleaning gave no usable deletion list in 6 of 6 rounds (100.0%, at least 61.0%")
    assert "dominant reason parse_error:no_json_list (6; first in counter c-3 rollout 0 round 0: '#44 23')" in first
    assert rest[0] == f"  cleaner: {cleaner}"
    assert rest[1].startswith("  likely cause: the cleaner's answers are not deletion lists")
    assert f"`freelm view {tmp_path / 'out.jsonl'} --source counter --id c-3 --rollout 0`" in rest[2]
    assert "freelm template infer" in rest[2] and "exit 3" in rest[3] and "--accept-unusable-cleaning" in rest[3]

    failed = CleaningTally()
    failed.add(("s", "1", 0), rounds(*[clean(error="h: NotFoundError HTTP 404: The model `x` does not exist.")] * 3))
    message = flag_message(failed, CleaningRule(), output=tmp_path / "o.jsonl", cleaner="'free', adapter 'x'")
    assert "dominant reason failed:unknown_adapter (3;" in message
    assert "does not serve an adapter under this name" in message and "GET /v1/models" in message
    accepted = flag_message(failed, CleaningRule(accept=True), output=tmp_path / "o.jsonl", cleaner="c")
    assert accepted.splitlines()[-1] == "  accepted by --accept-unusable-cleaning"


def test_the_threshold_flag_is_checked():
    from freelm.run.flags import build_parser, validate_args

    for bad in ("1", "-0.1"):
        args = build_parser().parse_args(["--data", "d", "--output", "o", "--endpoint", "h:1", "--tokenizer", "t",
                                          "--max-unusable-cleaning", bad])  # fmt: skip
        with pytest.raises(ValueError, match=r"--max-unusable-cleaning must be in \[0, 1\)"):
            validate_args(args)


# --------------------------------------------------------------------------- the runner: summary, manifest, exit code

REASONING = "Step one holds. " * 40  # never stops: every rollout runs to --max-tokens, cleaning every 16 tokens


def run(tmp_path, cleaner_output, *flags: str, problems: int = 3) -> tuple[int, RunSpec]:
    """One runner start, as ``runner.py`` runs it after its checks, against a scripted SGLang server."""
    outputs = {None: REASONING}
    if cleaner_output is not None:
        outputs["free"] = cleaner_output
    with SGLangTestServer(ScriptedEngine(outputs), deterministic=True) as server:
        spec = RunSpec.from_argv(
            [
                "--data", "unused", "--output", str(tmp_path / "out.jsonl"), "--endpoint", server.url,
                "--clean-every", "16", "--max-tokens", "64", "--context-limit", "4096", "--n-rollouts", "2",
                "--max-retries", "0", "--no-progress", *flags,
            ]
        )  # fmt: skip
        components = build_components(spec, tokenizer=Tokenizer(ScriptedTokenizer()))
        existing = inspect_output(spec.output, spec.settings, force=False)
        items = [Problem(id=str(i), source="t", prompt=f"Problem {i}?", answer="0") for i in range(problems)]
        return asyncio.run(_run_async(spec, components, items, existing, "run-id")), spec


def test_a_cleaner_that_never_answers_a_list_flags_the_run_and_keeps_every_rollout(tmp_path, capsys):
    code, spec = run(tmp_path, "I would delete the second paragraph.")
    out = capsys.readouterr()
    assert code == EXIT_CLEANING == 3
    assert len(read_rollouts(spec.output)) == 6  # the output is complete
    manifest = read_manifest(spec.output)
    assert manifest["status"] == "complete"
    cleaning = manifest["cleaning"]
    assert cleaning["verdict"] == "flagged" and cleaning["dominant"] == "parse_error:no_json_list"
    assert cleaning["output"]["rounds"] == cleaning["output"]["parse_errors"]["no_json_list"] == 24
    assert manifest["summary"]["cleaning"]["rounds"] == 24
    assert "cleaning: 24 rounds, 24 calls; 0 applied" in out.out
    assert out.err.startswith("error: cleaning gave no usable deletion list in 24 of 24 rounds")
    assert "(the project's default)" in out.err

    # resuming adds nothing and judges the whole output: still flagged
    code, _ = run(tmp_path, "I would delete the second paragraph.")
    again = capsys.readouterr()
    assert code == 3 and "rollouts: 0 done, 0 failed, 6 already present" in again.out
    assert "in 24 of 24 rounds" in again.err

    # the same output, accepted (the flag is not results-deciding: no --force needed)
    code, _ = run(tmp_path, "I would delete the second paragraph.", "--accept-unusable-cleaning")
    accepted = capsys.readouterr()
    assert code == 0 and accepted.err.startswith("warning: cleaning gave no usable deletion list")
    assert read_manifest(spec.output)["cleaning"]["verdict"] == "accepted"


def test_a_cleaner_whose_calls_all_fail_flags_the_run_with_the_reason(tmp_path, capsys):
    def unserved(request):
        raise BackendError("The model `free` does not exist.")

    code, spec = run(tmp_path, unserved, problems=2)
    err = capsys.readouterr().err
    assert code == 3 and len(read_rollouts(spec.output)) == 4
    assert "dominant reason failed:unknown_adapter (16;" in err
    assert read_manifest(spec.output)["cleaning"]["output"]["failed"] == {"unknown_adapter": 16}


def test_a_healthy_cleaner_passes_and_vanilla_is_not_judged(tmp_path, capsys):
    code, spec = run(tmp_path, "[]", problems=2)  # "nothing to delete" is a usable answer
    assert code == 0, capsys.readouterr().err
    cleaning = read_manifest(spec.output)["cleaning"]
    assert cleaning["verdict"] == "ok" and cleaning["output"]["unusable"] == 0
    out = capsys.readouterr()
    assert "cleaning: 16 rounds, 16 calls; 0 applied; 16 nothing to delete" in out.out and out.err == ""

    (tmp_path / "v").mkdir()
    code, spec = run(tmp_path / "v", None, "--mode", "vanilla", problems=2)
    assert code == 0 and read_manifest(spec.output)["cleaning"] is None
    assert "cleaning:" not in capsys.readouterr().out
