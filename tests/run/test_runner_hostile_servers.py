"""The runner against servers that misbehave: each costs one request's retry, never the run, a record or a hang.

Real SGLang-protocol servers on 127.0.0.1 (the counting model) and the real
runner entry point. A server that accepts connections and never answers is
skipped at start-up after the short probe deadline (the run goes on with the
others, and takes it back once it answers and passes the start-up checks); a
reply whose body never ends, or that holds more tokens than asked, is retried
and no record claims more than was asked.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from freelm import http_limits as transport
from freelm.backends.openai_compat import OpenAIBackend
from freelm.backends.pool import EndpointPool
from freelm.free import MAX_NOTES
from freelm.jsonl import iter_jsonl
from freelm.manifest import manifest_path
from freelm.records import MAX_RAW_OUTPUT_CHARS, read_rollouts
from freelm.run.cli import main
from freelm.run.components import Components, check_health, vet_returning_endpoints
from freelm.run.spec import RunSpec
from freelm.testing.counting import CountingBackend, CountingEngine, counting_files
from freelm.testing.sglang_server import SGLangTestServer

TARGET = 20
PROBLEMS = 3
FLAGS = ["--n-rollouts", "1", "--clean-every", "16", "--context-limit", "300", "--max-tokens", "600", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return counting_files(tmp_path_factory.mktemp("hostile"), TARGET, PROBLEMS)


def run_runner(argv: list[str], limit_s: float) -> tuple[int, float]:
    """``main(argv)`` in a thread: (exit code, seconds); fails the test if it runs past ``limit_s``."""
    outcome: list[int] = []
    started = time.perf_counter()
    thread = threading.Thread(target=lambda: outcome.append(main(argv)), daemon=True)
    thread.start()
    thread.join(limit_s)
    assert outcome, f"the runner still ran after {limit_s:g}s"
    return outcome[0], time.perf_counter() - started


def args(setup, out: Path, *endpoints: str, more: tuple[str, ...] = ()) -> list[str]:
    _, tokenizer_dir, data = setup
    urls = [a for url in endpoints for a in ("--endpoint", url.removeprefix("http://"))]
    return ["--data", str(data), "--output", str(out), "--tokenizer", str(tokenizer_dir), *urls, *FLAGS, *more]


def every_rollout_once(out: Path) -> list:
    keys = [(o["id"], o["rollout"]) for _, o in iter_jsonl(out, tolerate_torn_tail=False)]
    assert sorted(keys) == [(str(i), 0) for i in range(PROBLEMS)]
    return read_rollouts(out)


def test_an_endpoint_that_never_answers_is_skipped_at_start_and_the_run_completes(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(transport, "PROBE_TIMEOUT_S", 1.0)  # --timeout stays at its 600 s default
    tokenizer = setup[0]
    with (
        SGLangTestServer(CountingEngine(tokenizer, target=TARGET)) as good,
        SGLangTestServer(CountingEngine(tokenizer, target=TARGET)) as mute,
    ):
        mute.stop_answering()
        code, seconds = run_runner(args(setup, tmp_path / "out.jsonl", mute.url, good.url), limit_s=120)
        err = capsys.readouterr().err
        assert code == 0, err
        assert f"skipping sglang@{mute.url} ({mute.url}: no answer within 1s)" in err and "Traceback" not in err
        assert mute.requests["/server_info"] == 0 and mute.requests["/generate"] == 0  # asked once, never waited on
    assert len(every_rollout_once(tmp_path / "out.jsonl")) == PROBLEMS
    manifest = json.loads(manifest_path(tmp_path / "out.jsonl").read_text())
    assert manifest["status"] == "complete"


def test_an_endpoint_whose_start_up_check_never_answers_is_skipped_at_the_probe_deadline(
    setup, tmp_path, capsys, monkeypatch
):
    """An OpenAI-route server that lists its models but never answers the check's one-token completion."""
    monkeypatch.setattr(transport, "PROBE_TIMEOUT_S", 1.0)
    tokenizer = setup[0]
    with (
        SGLangTestServer(CountingEngine(tokenizer, target=TARGET), served_model_name="m") as good,
        SGLangTestServer(CountingEngine(tokenizer, target=TARGET), served_model_name="m") as stuck,
    ):
        stuck.delay_next(3600)  # the first completion it gets: the start-up check's probe
        more = ("--backend", "openai", "--served-model", "m")
        code, _ = run_runner(args(setup, tmp_path / "out.jsonl", stuck.url, good.url, more=more), limit_s=120)
        err = capsys.readouterr().err
        assert code == 0, err
        assert f"skipping openai@{stuck.url}/v1 (" in err and "no complete reply within 1s" in err
    assert len(every_rollout_once(tmp_path / "out.jsonl")) == PROBLEMS


def test_every_endpoint_silent_exits_2_after_the_named_wait(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(transport, "PROBE_TIMEOUT_S", 1.0)
    with SGLangTestServer(CountingEngine(setup[0], target=TARGET)) as mute:
        mute.stop_answering()
        url = mute.url
        code, seconds = run_runner(args(setup, tmp_path / "out.jsonl", url, more=("--down-wait", "2")), 60)
    err = capsys.readouterr().err
    assert code == 2 and seconds < 30
    assert f"error: no healthy endpoint in reasoner after 2s (sglang@{url}: {url}: no answer within 1s)" in err
    assert "Traceback" not in err and not (tmp_path / "out.jsonl").exists()


def test_endless_and_overlong_replies_are_retried_and_no_record_claims_more_than_asked(setup, tmp_path, capsys):
    tokenizer = setup[0]
    with SGLangTestServer(CountingEngine(tokenizer, target=TARGET)) as server:
        server.endless_body_next()
        server.overlong_next(2_000_000)
        server.overlong_next(5_000)
        more = ("--concurrency", "1", "--skip-isolation-check")  # the faults are the rollouts': no start-up probe
        code, _ = run_runner(args(setup, tmp_path / "out.jsonl", server.url, more=more), 120)
        assert server.requests["/generate"] > 3  # the three faults were served, and retried
    assert code == 0, capsys.readouterr().err
    records = every_rollout_once(tmp_path / "out.jsonl")
    for record in records:
        assert record.finish_reason == "stop" and record.generated_tokens <= 600
        assert record.peak_context_tokens < 300
        assert all(r.generated_tokens <= 16 for r in record.rounds)  # every chunk asked for at most --clean-every
    manifest = json.loads(manifest_path(tmp_path / "out.jsonl").read_text())
    assert manifest["summary"]["retries"] == 3
    assert (tmp_path / "out.jsonl").stat().st_size < 200_000


def test_an_endpoint_back_with_a_smaller_window_or_without_the_adapter_is_not_readmitted(setup):
    """The re-admission check holds a returning endpoint to the window and the model names the run started with."""
    tokenizer = setup[0]
    spec = RunSpec.from_argv(["--data", "x", "--output", "x", "--context-limit", "1000", "--adapter-name", "free"])

    async def verdicts(urls: list[str]) -> list[str | None]:
        pool = EndpointPool([OpenAIBackend(url + "/v1", "m") for url in urls], name="reasoner", remote=True)
        components = Components(reasoner=pool, tokenizer=tokenizer, cleaner=None, pools=(pool,), cleaner_pool=pool)
        run_window = (await pool.endpoints[0].backend.server_limits()).window
        vet_returning_endpoints(spec, components, {id(pool): run_window})
        try:
            return [await pool.vet(e.backend) for e in pool.endpoints]
        finally:
            await pool.aclose()

    def server(context_length: int) -> SGLangTestServer:
        engine = CountingEngine(tokenizer, target=TARGET)
        return SGLangTestServer(engine, context_length=context_length, served_model_name="m")

    with server(1000) as wide, server(1000) as same, server(500) as narrow, server(1000) as no_adapter:
        no_adapter.handle_unload_adapter({"lora_name": "free"})
        ok, same_ok, smaller, unserved = asyncio.run(verdicts([wide.url, same.url, narrow.url, no_adapter.url]))
    assert ok is None and same_ok is None
    assert smaller.startswith("not re-admitted: it serves 498 tokens per request") and "less than the 998" in smaller
    assert unserved.startswith("not re-admitted: ") and "the cleaner's adapter 'free'" in unserved


def test_a_cleaner_answering_10000_commands_per_call_keeps_every_round_small(setup, tmp_path, capsys):
    """Notes about dropped items and the stored raw answer are capped per round, and say what they left out."""
    tokenizer, _, _ = setup
    hostile = json.dumps([{"prefix": f"step {i}\n", "suffix": "zz"} for i in range(300)] + [1] * 9_700)
    assert len(tokenizer.encode(hostile)) < 32_768  # within the cleaner's budget: an answer the engine could give
    with SGLangTestServer(CountingEngine(tokenizer, target=TARGET), context_length=65_536) as server:
        server.override_next_adapter_output(hostile, times=10_000)
        more = ("--clean-max-tokens", "32768", "--context-limit", "40000", "--accept-unusable-cleaning")
        code, _ = run_runner(args(setup, tmp_path / "out.jsonl", server.url, more=more), 300)
        assert code == 0, capsys.readouterr().err
        assert server.adapter_requests["free"] > 0
    records = every_rollout_once(tmp_path / "out.jsonl")
    rounds = [r.clean for record in records for r in record.rounds if r.clean is not None]
    assert rounds and all(c.raw_output.endswith(f"{len(hostile) - MAX_RAW_OUTPUT_CHARS:,} more characters not stored]")
                          for c in rounds)  # fmt: skip
    assert all(len(c.dropped) == MAX_NOTES + 2 and c.dropped[-2].startswith("9684 more items dropped") for c in rounds)
    per_round = (tmp_path / "out.jsonl").stat().st_size / len(rounds)
    assert per_round < 40_000  # the raw answer alone is 42 KB a round, its notes were 210 KB


def test_an_in_process_engine_is_never_held_for_the_start_up_checks(setup):
    """Only a remote pool's returning endpoints are vetted: an in-process engine has nothing to check."""
    tokenizer = setup[0]
    pool = EndpointPool([CountingBackend(tokenizer, target=TARGET)], remote=False, name="local")

    async def go():
        await check_health(Components(reasoner=pool, tokenizer=tokenizer, cleaner=None, pools=(pool,)))
        await pool.aclose()

    asyncio.run(go())
    assert pool.vet is None and pool.endpoints_up == 1
