"""The window edge against the SGLang stand-in's real rules, on the SGLang and OpenAI-compatible backends.

A 1000-token window, the counting model told to count far past it: vanilla with
``--max-tokens`` equal to the window keeps every rollout (finished
``context_overflow``, none in OUT.errors.jsonl), and Free()LM with the default
``--clean-max-tokens`` (1024, more than the whole window) keeps cleaning up to
the window and finishes with the right answer. Two windows at once (the served
one and ``--context-limit``) allow what both allow; a server whose real window is
smaller than the one it reports ends rollouts as ``context_overflow``, not as
failures to retry.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from freelm.backends.base import ContextWindow
from freelm.backends.openai_compat import OpenAIBackend
from freelm.backends.sglang import SGLangBackend
from freelm.cleaners import FreeModuleCleaner
from freelm.loop import LoopConfig, run_rollout
from freelm.manifest import errors_path, manifest_path
from freelm.prompts import render_reasoning_prompt
from freelm.records import read_rollouts
from freelm.run.cli import main
from freelm.testing.counting import CountingEngine, counting_answer, counting_tokenizer
from freelm.testing.engines import ScriptedEngine, ScriptedTokenizer
from freelm.testing.sglang_server import SGLangTestServer
from freelm.tokenizer import Tokenizer

WINDOW = 1000
TARGET = 400  # ~1,600 tokens of counting: four windows' worth
PROBLEMS, ROLLOUTS = 2, 2


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    root = tmp_path_factory.mktemp("window")
    tokenizer = counting_tokenizer(TARGET, steps=TARGET + 1)
    tokenizer.hf.save_pretrained(root / "tokenizer")
    data = root / "problems.jsonl"
    lines = [
        json.dumps({"id": i, "prompt": f"Count to {TARGET} ({i}).", "answer": str(TARGET)}) for i in range(PROBLEMS)
    ]
    data.write_text("\n".join(lines) + "\n")
    template = root / "clean.txt"
    template.write_text("<|im_start|>user\nFree:\n{problem}\n{thinking}<|im_end|>\n<|im_start|>assistant\n")
    engine = CountingEngine(tokenizer, target=TARGET)
    with SGLangTestServer(engine, served_model_name="counter", context_length=WINDOW, cache_report=True) as server:
        yield server, root, data, template


def _run(server, root: Path, data: Path, out: Path, backend: str, *extra: str) -> int:
    endpoint = server.url.removeprefix("http://")
    route = ["--backend", "openai", "--served-model", "counter"] if backend == "openai" else ["--backend", "sglang"]
    return main([
        "--data", str(data), "--output", str(out), "--endpoint", endpoint, "--tokenizer", str(root / "tokenizer"),
        "--n-rollouts", str(ROLLOUTS), "--context-limit", str(WINDOW), "--temperature", "0", "--no-progress",
        "--max-retries", "0", *route, *extra,
    ])  # fmt: skip


@pytest.mark.parametrize("backend", ["sglang", "openai"])
def test_vanilla_with_max_tokens_equal_to_the_window_keeps_every_rollout(counting, tmp_path, backend):
    server, root, data, _ = counting
    server.reset()
    out = tmp_path / "vanilla.jsonl"
    assert _run(server, root, data, out, backend, "--mode", "vanilla", "--max-tokens", str(WINDOW)) == 0
    records = read_rollouts(out)
    assert len(records) == PROBLEMS * ROLLOUTS and not errors_path(out).exists()
    assert {r.finish_reason for r in records} == {"context_overflow"}
    # SGLang serves max_req_len - 1 = 998 tokens per request: the rollout is exactly that full
    assert {r.final_context_tokens for r in records} == {WINDOW - 2}
    assert all(r.response.startswith("step 1\n") for r in records)  # the text is kept, to be graded
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["served"]["reasoner"]["window"]["max_input"] == WINDOW - 7
    assert manifest["seeds_honoured"] is False


@pytest.mark.parametrize("backend", ["sglang", "openai"])
def test_freelm_with_default_clean_max_tokens_keeps_cleaning_up_to_the_window(counting, tmp_path, backend):
    server, root, data, template = counting
    server.reset()
    out = tmp_path / "freelm.jsonl"
    code = _run(
        server, root, data, out, backend, "--mode", "freelm", "--clean-every", "128", "--max-tokens", "8000",
        "--clean-template", str(template),
    )  # fmt: skip
    assert code == 0
    records = read_rollouts(out)
    assert len(records) == PROBLEMS * ROLLOUTS and not errors_path(out).exists()
    for record in records:
        assert record.finish_reason == "stop" and record.response.endswith(counting_answer(TARGET))
        assert record.generated_tokens > WINDOW and record.peak_context_tokens <= WINDOW - 2
        cleans = [r.clean for r in record.rounds if r.clean is not None]
        assert len(cleans) >= 4 and all(c.error is None and c.no_room is None for c in cleans)
        # every cleaning call asked for what its window left, never the default 1024
        assert all(c.max_new_tokens < 1024 for c in cleans)
        assert all(c.prompt_tokens + c.max_new_tokens <= WINDOW - 2 for c in cleans)


def test_a_context_400_on_a_reasoning_call_ends_the_rollout_context_overflow_with_its_text():
    """A server whose window is smaller than the one the loop was given: its 400 is an overflow, not a loss."""
    tokenizer = Tokenizer(ScriptedTokenizer())
    prompt = len(tokenizer.encode(render_reasoning_prompt("Count.", tokenizer)))
    with SGLangTestServer(ScriptedEngine({None: "x" * 1000}), context_length=prompt + 100) as server:

        async def go():
            backend = SGLangBackend(server.url, max_retries=0)
            # --context-limit alone, without SGLang's margins: the "Input length exceeds" case
            config = LoopConfig(max_tokens=400, context_limit=prompt + 100)
            try:
                return await run_rollout("Count.", reasoner=backend, tokenizer=tokenizer, cleaner=None, config=config)
            finally:
                await backend.aclose()

        result = asyncio.run(go())
    assert result.finish_reason == "context_overflow" and "exceeds the maximum allowed length" in result.error
    assert result.response == "x" * 98 and result.generated_tokens == 98  # capped at max_req_len - input - 1


#: How a refusal reaches the client, the server's words, and how the rollout ends: only a window's words are an
#: overflow (base.py's markers); any other 400 or abort is a failure, written to OUT.errors.jsonl and retried.
REFUSALS = [
    (
        "sglang",
        400,
        "The input (9000 tokens) is longer than the model's context length (4096 tokens).",
        "context_overflow",
    ),
    ("sglang", 400, "Unknown sampling parameter: frequency_penalty_x", "error"),
    (
        "sglang",
        None,
        "Input length (5000 tokens) exceeds the maximum allowed length (4090 tokens).",
        "context_overflow",
    ),
    ("sglang", None, "Aborted by the scheduler: out of memory", "error"),
    (
        "openai",
        400,
        "Requested token count exceeds the model's maximum context length of 4096 tokens.",
        "context_overflow",
    ),
    ("openai", 400, "Unknown sampling parameter: frequency_penalty_x", "error"),
]


@pytest.mark.parametrize(("route", "status", "words", "finish"), REFUSALS)
def test_only_a_refusal_in_a_windows_words_ends_a_rollout_as_context_overflow(route, status, words, finish):
    """A 400 (or, on /generate, an abort without a status) that names the window; anything else is an error."""
    tokenizer = Tokenizer(ScriptedTokenizer())
    with SGLangTestServer(ScriptedEngine({None: "x" * 1000}), served_model_name="m") as server:
        if status is None:
            server.abort_next(words)
        else:
            server.fail_next(status, words)

        async def go():
            if route == "sglang":
                backend = SGLangBackend(server.url, max_retries=0)
            else:
                backend = OpenAIBackend(server.url + "/v1", "m", max_retries=0)
            try:
                config = LoopConfig(max_tokens=50, context_limit=4096)
                return await run_rollout("Count.", reasoner=backend, tokenizer=tokenizer, cleaner=None, config=config)
            finally:
                await backend.aclose()

        result = asyncio.run(go())
    assert result.finish_reason == finish and words in result.error


def test_a_cleaning_prompt_with_no_room_is_recorded_not_sent():
    tokenizer = Tokenizer(ScriptedTokenizer())
    engine = ScriptedEngine({None: "x", "free": "[]"})
    with SGLangTestServer(engine) as server:

        async def go():
            backend = SGLangBackend(server.url, max_retries=0)
            window = ContextWindow.sglang(300)  # max_input 293: the thinking below leaves no room
            cleaner = FreeModuleCleaner(backend, window=window, tokenizer=tokenizer)
            try:
                return await cleaner.clean("Count.", "step 1\n" * 60), cleaner.headroom("Count.", 400)
            finally:
                await backend.aclose()

        outcome, headroom = asyncio.run(go())
    assert outcome.no_room.startswith("cleaning prompt of") and outcome.edit.spans == []
    assert headroom < 0 and server.requests["/generate"] == 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_runner_records_whether_seeds_are_honoured_and_warns_once(counting, tmp_path, capsys, deterministic):
    _, root, data, _ = counting
    engine = CountingEngine(Tokenizer.from_pretrained(root / "tokenizer"), target=TARGET)
    with SGLangTestServer(engine, served_model_name="counter", deterministic=deterministic) as server:
        out = tmp_path / "seeded.jsonl"
        args = ["--mode", "vanilla", "--max-tokens", "64", "--temperature", "0.6", "--min-p", "0"]
        assert _run(server, root, data, out, "sglang", *args) == 0
        warned = capsys.readouterr().err.count("ignores per-request seeds")
        assert json.loads(manifest_path(out).read_text())["seeds_honoured"] is deterministic
        assert warned == (0 if deterministic else 1)
        refused = _run(server, root, data, tmp_path / "min_p.jsonl", "sglang", *args[:-1], "0.05")
        assert refused == (2 if deterministic else 0)  # the deterministic sampler would assert: nothing sent
        if deterministic:
            assert "asserts on min_p > 0" in capsys.readouterr().err
            assert not (tmp_path / "min_p.jsonl").exists() and server.status == "up"


# --------------------------------------------------------------------------- two windows at once

WINDOWS = st.builds(ContextWindow, st.integers(0, 3000), st.integers(0, 3000), st.just("w"))


@given(WINDOWS, WINDOWS, st.integers(0, 3100))
def test_two_windows_at_once_allow_exactly_what_both_allow(first, second, prompt):
    """Whichever window contains the other, or neither: a prompt gets the smaller room of the two, in either order."""
    assert first.narrow(second).room(prompt) == min(first.room(prompt), second.room(prompt))
    assert second.narrow(first).room(prompt) == min(first.room(prompt), second.room(prompt))
    assert first.narrow(None).room(prompt) == first.room(prompt)


@pytest.mark.parametrize("budget_first", [True, False])
def test_a_context_limit_just_below_sglangs_window_bounds_prompt_plus_response(budget_first):
    """``--context-limit 997`` on a 1000-token SGLang window: neither contains the other.

    The budget takes longer prompts (up to 995 against SGLang's 993) but shorter
    requests (996 against 998): together, prompts up to 993 and never more than
    996 tokens in all, so prompt + response stays below the flag.
    """
    budget, served = ContextWindow.budget(997), ContextWindow.sglang(1000)
    window = budget.narrow(served) if budget_first else served.narrow(budget)
    assert [window.room(p) for p in (0, 992, 993, 994, 995)] == [996, 4, 3, 0, 0]
    assert max(p + window.room(p) for p in range(994)) == 996
    assert "--context-limit" in window.source and "SGLang" in window.source


@pytest.mark.parametrize("backend", ["sglang", "openai"])
def test_a_rollout_under_a_context_limit_below_the_window_stays_below_the_limit(counting, tmp_path, backend):
    server, root, data, _ = counting
    server.reset()
    out = tmp_path / "limited.jsonl"
    assert _run(server, root, data, out, backend, "--mode", "vanilla", "--context-limit", "997") == 0
    records = read_rollouts(out)
    assert len(records) == PROBLEMS * ROLLOUTS and {r.finish_reason for r in records} == {"context_overflow"}
    assert {r.final_context_tokens for r in records} == {996}  # not SGLang's 998: the flag is the tighter side


# --------------------------------------------------------------------------- a window smaller than reported


class SmallerThanReported(SGLangTestServer):
    """What the runner meets behind sgl-router when its workers were launched with different ``--context-length``.

    The router forwards ``/server_info`` to any worker: here the answer comes from
    one serving ``reported`` tokens, while ``/generate`` reaches this one, whose
    window is ``context_length`` (every rule applied is the stand-in's).
    """

    def __init__(self, engine, *, reported: int, **kwargs):
        super().__init__(engine, **kwargs)
        self.reported = reported

    def server_info(self) -> dict:
        larger = min(self.reported - 1, self.kv_capacity - 1)  # managers/tp_worker.py, for the other worker
        return {**super().server_info(), "context_length": self.reported, "max_req_input_len": larger - 5}


@pytest.mark.parametrize(("backend", "mode"), [("sglang", "vanilla"), ("sglang", "freelm"), ("openai", "freelm")])
def test_a_window_refusal_ends_the_rollout_as_context_overflow_and_is_not_retried(counting, tmp_path, backend, mode):
    _, root, data, template = counting
    engine = CountingEngine(Tokenizer.from_pretrained(root / "tokenizer"), target=TARGET)
    flags = ["--mode", mode, "--max-tokens", "8000", "--context-limit", str(2 * WINDOW)]
    if mode == "freelm":  # one cleaning round (its call fits the real window), then the rest in one reasoning call
        flags += ["--clean-every", "128", "--max-clean-rounds", "1", "--clean-max-tokens", "64"]
        flags += ["--clean-template", str(template)]
    out = tmp_path / "refused.jsonl"
    with SmallerThanReported(engine, served_model_name="counter", context_length=WINDOW, reported=2 * WINDOW) as server:
        assert _run(server, root, data, out, backend, *flags) == 0
        records = read_rollouts(out)
        assert len(records) == PROBLEMS * ROLLOUTS and not errors_path(out).exists()
        for record in records:
            assert record.finish_reason == "context_overflow"
            assert "maximum context length of 1000 tokens" in record.error
            if mode == "freelm":  # the text before the refusal is kept
                assert record.cleaning_rounds == 1 and record.response.startswith("step ")
                assert [r.clean.error for r in record.rounds if r.clean is not None] == [None]
        assert _run(server, root, data, out, backend, *flags) == 0  # the same command again: nothing to retry
    summary = json.loads(manifest_path(out).read_text())["summary"]
    assert summary["present_at_start"] == PROBLEMS * ROLLOUTS and summary["done"] == summary["failed"] == 0
    assert read_rollouts(out) == records and not errors_path(out).exists()
