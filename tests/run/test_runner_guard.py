"""Careless use of the runner: a locked output, an unwritable or full disk, a write failing mid-run, runs killed
while starting. (Two runner processes on one output: test_runner_resume.py; a prompt larger than the window:
loop/test_loop.py.)"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import json
import os
from pathlib import Path

import pytest

from freelm import output_guard
from freelm.backends.base import GenerateRequest, GenerateResult
from freelm.backends.pool import EndpointPool
from freelm.cleaners import FreeModuleCleaner
from freelm.data import Problem
from freelm.jsonl import iter_jsonl
from freelm.loop import run_rollout
from freelm.manifest import errors_path, lock_path, manifest_path
from freelm.output_guard import OutputLock, OutputWriteError
from freelm.records import read_rollouts
from freelm.run import batch as batch_module
from freelm.run.batch import RunSummary, run_batch
from freelm.run.cli import run
from freelm.run.components import Components
from freelm.run.flags import build_parser
from freelm.run.plan import Job, record_start
from freelm.run.spec import RunSpec
from freelm.testing.counting import CountingBackend, counting_tokenizer

TARGET = 30
FLAGS = ["--clean-every", "20", "--context-limit", "400", "--max-tokens", "600"]


@pytest.fixture(scope="module")
def tokenizer():
    return counting_tokenizer(TARGET)


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"Count to {TARGET} ({i}).", "answer": "30"}) + "\n"
                            for i in range(3)))  # fmt: skip
    return path


def cli_args(data: Path, output: Path, tokenizer_dir: Path) -> argparse.Namespace:
    return build_parser().parse_args(
        ["--data", str(data), "--output", str(output), "--endpoint", "127.0.0.1:9", "--tokenizer", str(tokenizer_dir),
         "--no-progress", *FLAGS]
    )  # fmt: skip


@pytest.fixture
def tokenizer_dir(tmp_path, tokenizer) -> Path:
    tokenizer.hf.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def batch(output: Path, tokenizer, *, run_id: str | None = None, backend: type = CountingBackend) -> RunSummary:
    spec = RunSpec.from_argv(
        ["--data", "x", "--output", str(output), "--n-rollouts", "2", "--concurrency", "2", "--no-progress", *FLAGS]
    )
    pool = EndpointPool([backend(tokenizer, target=TARGET)], remote=False, probe_interval=0.01)
    problems = [Problem(str(i), "count", f"Count to {TARGET} ({i}).", "30") for i in range(3)]
    components = Components(reasoner=pool, tokenizer=tokenizer, cleaner=FreeModuleCleaner(pool), pools=(pool,))

    async def go():
        try:
            return await run_batch(problems, spec, components, run_id=run_id)
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_a_locked_output_exits_2_naming_the_holder(tmp_path, data, tokenizer_dir, capsys):
    out = tmp_path / "out.jsonl"
    with OutputLock(out):
        assert run(cli_args(data, out, tokenizer_dir)) == 2
    err = capsys.readouterr().err
    assert f"{out} is being written by another runner (pid {os.getpid()} on " in err
    assert not out.exists() and not manifest_path(out).exists()
    # released: the lock file stays, empty of meaning, and can be taken again
    assert lock_path(out).exists()
    with OutputLock(out):
        pass


@pytest.mark.parametrize(
    "where, message",
    [
        (lambda tmp: tmp / "missing-dir" / "out.jsonl", "does not exist"),
        (lambda tmp: tmp / "problems.jsonl" / "out.jsonl", "does not exist"),  # parent is a file
        (lambda tmp: Path("/proc/freelm-test-out.jsonl"), "cannot create"),  # read-only even for root
        (lambda tmp: tmp, "is not a writable file"),  # the output is a directory
    ],
    ids=["missing-dir", "parent-is-a-file", "read-only-fs", "output-is-a-dir"],
)
def test_unwritable_output_exits_2_before_any_request(
    tmp_path, data, tokenizer_dir, capsys, monkeypatch, where, message
):
    monkeypatch.setattr(output_guard, "MIN_FREE_BYTES", 0)  # /proc reports no free space: test the write itself
    assert run(cli_args(data, where(tmp_path), tokenizer_dir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output ") and message in err and "Traceback" not in err


def test_a_lone_surrogate_in_the_data_exits_2_naming_file_line_and_field(tmp_path, tokenizer_dir, capsys):
    """JSON's \\ud800 escape decodes to a lone surrogate: no tokenizer takes it, so the run used to fail every
    rollout forever ("re-run to retry"); it is bad input, refused before anything is sent."""
    data = tmp_path / "problems.jsonl"
    data.write_text('{"id": 1, "prompt": "Count to 30."}\n{"id": 2, "prompt": "Count \\ud800 to 30."}\n')
    out = tmp_path / "out.jsonl"
    args = cli_args(data, out, tokenizer_dir)
    args.down_wait = 1.0  # (before the fix the run went on to its endpoint, 127.0.0.1:9, which refuses)
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: {data}:2: prompt: not valid Unicode text: a lone surrogate '\\ud800' at character 6\n"
    assert not out.exists()


def test_too_little_free_space_exits_2(tmp_path, data, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setattr(output_guard, "MIN_FREE_BYTES", 2**62)
    assert run(cli_args(data, tmp_path / "out.jsonl", tokenizer_dir)) == 2
    assert "MiB free" in capsys.readouterr().err and not (tmp_path / "out.jsonl.lock").exists()


def test_a_write_failing_mid_run_stops_cleanly_and_a_rerun_completes(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "out.jsonl"
    real_append, calls = batch_module.append_bytes, []

    def disk_fills_after_two(handle, data: bytes):
        for line in data.splitlines(keepends=True):
            calls.append(line)
            if len(calls) > 2:
                handle.write(b'{"half": ')  # what a full disk leaves: part of a line
                raise OSError(errno.ENOSPC, "No space left on device")
            real_append(handle, line)

    monkeypatch.setattr(batch_module, "append_bytes", disk_fills_after_two)
    with pytest.raises(OutputWriteError) as caught:
        batch(out, tokenizer)
    message = str(caught.value)
    assert "the disk is full" in message and "re-run the same command" in message and "intact" in message
    assert len(read_rollouts(out)) == 2  # the torn third line is dropped by readers
    assert json.loads(manifest_path(out).read_text())["status"] == "interrupted"

    monkeypatch.setattr(batch_module, "append_bytes", real_append)
    summary = batch(out, tokenizer)
    assert summary.done == 4 and summary.present_at_start == 2
    keys = [(o["id"], o["rollout"]) for _, o in iter_jsonl(out, tolerate_torn_tail=False)]
    assert sorted(keys) == [(str(i), r) for i in range(3) for r in range(2)]


class SurrogateCleaning(CountingBackend):
    """The counting model, whose cleaning replies for problem 1 carry a lone surrogate (what a server's JSON
    ``\\ud800`` escape decodes to): that rollout's record, raw cleaner answer and all, has no UTF-8 form."""

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if request.adapter is not None and "(1)." in (request.text or ""):
            return GenerateResult(text="[] \ud800", output_ids=[], finish_reason="stop", prompt_tokens=1,
                                  completion_tokens=3)  # fmt: skip
        return await super().generate(request)


def test_a_record_that_cannot_be_written_fails_alone_and_the_rest_of_its_batch_is_written(tmp_path, tokenizer):
    out = tmp_path / "out.jsonl"
    summary = batch(out, tokenizer, backend=SurrogateCleaning)  # 3 problems x 2 rollouts, 2 at a time
    assert summary.done == 4 and summary.failed == 2
    assert sorted((r.id, r.rollout) for r in read_rollouts(out)) == [(i, r) for i in ("0", "2") for r in (0, 1)]
    errors = [o for _, o in iter_jsonl(errors_path(out), tolerate_torn_tail=False)]
    assert sorted((e["id"], e["rollout"]) for e in errors) == [("1", 0), ("1", 1)]
    assert all(e["error"].startswith("its record cannot be written: UnicodeEncodeError: ") for e in errors)
    assert json.loads(manifest_path(out).read_text())["status"] == "incomplete"


def test_previous_runs_counts_runs_killed_while_starting(tmp_path, tokenizer):
    out = tmp_path / "out.jsonl"
    settings = RunSpec.from_argv(["--data", "x", "--output", str(out), *FLAGS]).settings
    record_start(out, settings, "killed-while-loading")  # then SIGKILL: no other manifest write
    record_start(out, settings, "second")
    batch(out, tokenizer, run_id="second")
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["run_id"] == "second" and manifest["status"] == "complete"
    assert [r["status"] for r in manifest["previous_runs"]] == ["starting"]
    batch(out, tokenizer)  # a library caller without record_start
    assert [r["status"] for r in json.loads(manifest_path(out).read_text())["previous_runs"]] == [
        "starting",
        "complete",
    ]


def test_a_batch_of_finished_rollouts_is_written_with_one_fsync_per_file(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "out.jsonl"
    settings = RunSpec.from_argv(["--data", "x", "--output", str(out), *FLAGS]).settings
    result = asyncio.run(
        run_rollout("Count to 3.", reasoner=CountingBackend(tokenizer, target=3), tokenizer=tokenizer, cleaner=None)
    )
    jobs = [Job(Problem(str(i), "count", "Count to 3.", "3"), 0, i) for i in range(3)]
    finished = [batch_module._Finished(jobs[0], result, None), batch_module._Finished(jobs[1], None, "boom"),
                batch_module._Finished(jobs[2], result, None)]  # fmt: skip
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    with out.open("a", encoding="utf-8") as handle:
        batch_module._append_finished(handle, out, finished, settings)
    assert [(r.id, r.config_hash) for r in read_rollouts(out)] == [
        ("0", settings.config_hash),
        ("2", settings.config_hash),
    ]
    errors = [row for _, row in iter_jsonl(errors_path(out), tolerate_torn_tail=False)]
    assert [(e["id"], e["error"]) for e in errors] == [("1", "boom")]
    assert len(synced) == 2  # one per file, not one per line


def test_the_run_collects_garbage_less_often_and_restores_the_collector(tmp_path, tokenizer, monkeypatch):
    before, seen = gc.get_threshold(), []
    real_rollout = batch_module.run_rollout

    async def recording(*args, **kwargs):
        seen.append((gc.get_threshold()[0], gc.get_freeze_count() > 0))
        return await real_rollout(*args, **kwargs)

    monkeypatch.setattr(batch_module, "run_rollout", recording)
    assert batch(tmp_path / "out.jsonl", tokenizer).done == 6
    assert seen == [(20_000, True)] * 6  # during the run: young collections every 20k allocations, old heap frozen
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
