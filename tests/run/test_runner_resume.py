"""kill -9 the runner process at random points, resume, and every (id, rollout) is there exactly once.

The server is a real SGLang-protocol HTTP server on 127.0.0.1 over the counting
model (a delay per call keeps rollouts in flight when the kill lands), and the
runner is the real ``runner.py`` in a subprocess, so the kill hits everything:
the event loop, in-flight requests and a possibly half-written line.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from repo_paths import REPO

from freelm.jsonl import iter_jsonl
from freelm.manifest import manifest_path
from freelm.records import read_rollouts
from freelm.testing.counting import CountingEngine, counting_answer, counting_files
from freelm.testing.sglang_server import SGLangTestServer
from freelm.tokenizer import Tokenizer

TARGET = 24
PROBLEMS = 6
ROLLOUTS = 4


@pytest.fixture(scope="module")
def counting_setup(tmp_path_factory):
    """(server, tokenizer dir, data file): the tokenizer is saved so the runner subprocess loads the same ids."""
    tokenizer, tokenizer_dir, data = counting_files(tmp_path_factory.mktemp("resume"), TARGET, PROBLEMS)
    with SGLangTestServer(CountingEngine(tokenizer, target=TARGET, delay=0.03)) as server:
        yield server, tokenizer_dir, data


@pytest.fixture(scope="module")
def slow_setup(tmp_path_factory):
    """As ``counting_setup``, with calls slow enough (0.1 s) that a signal sent once 3 rollouts are written
    always lands mid-run: at 0.03 s a loaded machine could finish the other 21 before the test sent it,
    and the runner then rightly exited 0."""
    tokenizer, tokenizer_dir, data = counting_files(tmp_path_factory.mktemp("signals"), TARGET, PROBLEMS)
    with SGLangTestServer(CountingEngine(tokenizer, target=TARGET, delay=0.1)) as server:
        yield server, tokenizer_dir, data


def runner_command(server, tokenizer_dir: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "runner.py"), "--data", str(data), "--output", str(out),
        "--n-rollouts", str(ROLLOUTS), "--endpoint", server.url.removeprefix("http://"), "--tokenizer", str(tokenizer_dir),
        "--clean-every", "16", "--context-limit", "300", "--max-tokens", "800", "--concurrency", "3",
        "--max-retries", "1", "--timeout", "30", "--no-progress",
    ]  # fmt: skip


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_at_random_points_then_resume_gives_every_rollout_exactly_once(counting_setup, tmp_path):
    server, tokenizer_dir, data = counting_setup
    out = tmp_path / "out.jsonl"
    command = runner_command(server, tokenizer_dir, data, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    total = PROBLEMS * ROLLOUTS
    rng = random.Random(1234)
    mid_run_kills = 0
    for _ in range(3):
        before = line_count(out)
        wanted = min(total, before + rng.randint(1, 5))
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        deadline = time.monotonic() + 120
        while proc.poll() is None and line_count(out) < wanted and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.08))  # land anywhere: between writes, mid-request, mid-line
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            mid_run_kills += 1
        proc.communicate(timeout=60)
        assert line_count(out) >= before  # append-only: a kill never loses finished rollouts
        read_rollouts(out)  # whatever the kill left, the next reader copes (a torn tail is dropped)
    assert mid_run_kills >= 2 and line_count(out) < total

    final = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert final.returncode == 0, final.stderr
    assert f"{total} remaining" not in final.stdout and " 0 failed" in final.stdout
    parsed = [obj for _, obj in iter_jsonl(out, tolerate_torn_tail=False)]  # every line parses
    keys = [(o["source"], o["id"], o["rollout"]) for o in parsed]
    assert sorted(keys) == sorted(("problems", str(i), r) for i in range(PROBLEMS) for r in range(ROLLOUTS))
    assert len(set(keys)) == len(keys) == total
    assert all(o["finish_reason"] == "stop" and o["response"].endswith(counting_answer(TARGET)) for o in parsed)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["status"] == "complete" and len(manifest["previous_runs"]) == 3
    # killed: never got to finish (a kill while starting leaves "starting": every start is counted)
    assert all(run["status"] in ("starting", "running") for run in manifest["previous_runs"])


@pytest.mark.parametrize(
    "sig, code, line",
    [
        (signal.SIGINT, 130, "interrupted: finished rollouts are saved; re-run the same command to resume"),
        (signal.SIGTERM, 143, "terminated (SIGTERM): finished rollouts are saved; re-run the same command to resume"),
    ],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_and_sigterm_end_with_one_line_an_interrupted_manifest_and_a_resume_completes(
    slow_setup, tmp_path, sig, code, line
):
    server, tokenizer_dir, data = slow_setup
    out = tmp_path / "out.jsonl"
    command = runner_command(server, tokenizer_dir, data, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while proc.poll() is None and line_count(out) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = [text for text in err.splitlines() if not text.startswith("warning: ")]
    assert lines == [line], err  # one line: no traceback, no "exception was never retrieved"
    kept = line_count(out)
    assert kept >= 3 and len(read_rollouts(out)) == kept  # every finished rollout written whole
    assert json.loads(manifest_path(out).read_text())["status"] == "interrupted"

    final = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert final.returncode == 0, final.stderr
    keys = [(o["id"], o["rollout"]) for _, o in iter_jsonl(out, tolerate_torn_tail=False)]
    assert sorted(keys) == sorted((str(i), r) for i in range(PROBLEMS) for r in range(ROLLOUTS))
    assert f"{kept} already present" in final.stdout


def test_a_disk_that_fills_mid_run_ends_with_one_clear_line_and_a_resume_completes(counting_setup, tmp_path):
    """A real kernel refusal: the runner under a file-size limit (``ulimit -f``) that its output passes mid-run
    (the kernel writes part of the line, then refuses the rest, as a full disk does). One finished rollout per
    batch: the buffered writer kept the refused rest and raised it again, a raw OSError, when the file closed."""
    server, tokenizer_dir, data = counting_setup
    out = tmp_path / "out.jsonl"
    command = [*runner_command(server, tokenizer_dir, data, out), "--concurrency", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip

    def file_size_limit() -> None:  # in the child: the limit refuses writes past 7,000 bytes with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (7_000, 7_000))

    full = subprocess.run(
        command, env=env, capture_output=True, text=True, cwd=REPO, timeout=300, preexec_fn=file_size_limit
    )
    lines = [text for text in full.stderr.splitlines() if not text.startswith("warning: ")]
    assert full.returncode == 1 and len(lines) == 1, full.stderr  # one line: no traceback
    assert lines[0].startswith(
        f"error: the file reached the size limit of this process (ulimit -f) while writing {out} ("
    )
    assert "re-run the same command" in lines[0]
    assert not out.read_bytes().endswith(b"\n")  # the refused line is torn: the next start repairs it
    final = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert final.returncode == 0, final.stderr
    keys = [(o["id"], o["rollout"]) for _, o in iter_jsonl(out, tolerate_torn_tail=False)]
    assert sorted(keys) == sorted((str(i), r) for i in range(PROBLEMS) for r in range(ROLLOUTS))


def test_separate_cleaner_endpoint_gets_every_cleaning_call_and_no_reasoning(counting_setup, tmp_path):
    server, tokenizer_dir, data = counting_setup
    from freelm.run.cli import main

    server.reset()
    with SGLangTestServer(CountingEngine(Tokenizer.from_pretrained(tokenizer_dir), target=TARGET)) as cleaner_server:
        out = tmp_path / "out.jsonl"
        command = runner_command(server, tokenizer_dir, data, out)[2:]
        assert main([*command, "--n-rollouts", "1", "--cleaner-endpoint", cleaner_server.url]) == 0
        assert server.adapter_requests["free"] == 0 and server.adapter_requests[None] > 0
        assert cleaner_server.adapter_requests[None] == 0 and cleaner_server.adapter_requests["free"] > 0
        urls = [server.url, cleaner_server.url]
    records = read_rollouts(out)
    assert len(records) == PROBLEMS
    assert sum(r.cleaning_rounds for r in records) == cleaner_server.adapter_requests["free"]
    manifest = json.loads(manifest_path(out).read_text())
    assert [e["name"] for pool in manifest["endpoints"] for e in pool["endpoints"]] == [f"sglang@{u}" for u in urls]


def test_two_runners_on_one_output_one_exits_2_naming_the_other_and_every_rollout_is_written_once(
    counting_setup, tmp_path
):
    _, tokenizer_dir, data = counting_setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out.jsonl"
    slow = CountingEngine(Tokenizer.from_pretrained(tokenizer_dir), delay=0.25)  # the first runner is still busy
    with SGLangTestServer(slow) as server:
        command = runner_command(server, tokenizer_dir, data, out)
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        results = {proc.pid: (proc.wait(timeout=300), *proc.communicate()) for proc in (first, second)}
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], results
    winner = next(pid for pid, (code, _, _) in results.items() if code == 0)
    loser_err = next(err for code, _, err in results.values() if code == 2)
    assert f"is being written by another runner (pid {winner} on " in loser_err
    keys = [(o["id"], o["rollout"]) for _, o in iter_jsonl(out, tolerate_torn_tail=False)]
    assert sorted(keys) == sorted((str(i), r) for i in range(PROBLEMS) for r in range(ROLLOUTS))


def test_a_symlink_to_a_live_runs_output_is_refused_naming_the_other_path(counting_setup, tmp_path):
    _, tokenizer_dir, data = counting_setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    (tmp_path / "real").mkdir()
    out = tmp_path / "real" / "out.jsonl"
    (tmp_path / "alias").symlink_to(tmp_path / "real")  # a link anywhere on the way counts
    (tmp_path / "alias" / "other.jsonl").symlink_to(out)
    alias = tmp_path / "alias" / "other.jsonl"
    slow = CountingEngine(Tokenizer.from_pretrained(tokenizer_dir), delay=0.25)
    with SGLangTestServer(slow) as server:
        first = subprocess.Popen(
            runner_command(server, tokenizer_dir, data, out), env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while line_count(out) < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        second = subprocess.run(
            runner_command(server, tokenizer_dir, data, alias), env=env, capture_output=True, text=True, cwd=REPO,
            timeout=120,
        )  # fmt: skip
        assert first.wait(timeout=300) == 0, first.communicate()
    assert second.returncode == 2, second.stderr
    assert f"error: {alias} is the same file as {out}, which is being written by another runner (pid {first.pid} " in (
        second.stderr
    )
    keys = [(o["id"], o["rollout"]) for _, o in iter_jsonl(out, tolerate_torn_tail=False)]
    assert sorted(keys) == sorted((str(i), r) for i in range(PROBLEMS) for r in range(ROLLOUTS))


def test_a_registered_cleaner_runs_through_runner_py_with_its_settings_in_the_config_hash(
    counting_setup, tmp_path, monkeypatch
):
    """A new cleaner is one class: ``--cleaner`` offers it, its field is a flag, hashed, and reaches the instance."""
    from freelm.cleaners import registry
    from freelm.cleaners.base import CleanOutcome
    from freelm.free import remove_spans
    from freelm.run.cli import main
    from freelm.setting import setting

    @dataclass
    class Throwaway:
        tokenizer: Tokenizer
        keep_lines: int = setting(2, flag="--throwaway-keep-lines", minimum=0, help="lines kept")
        name: str = "throwaway"

        async def clean(self, problem: str, thinking: str) -> CleanOutcome:
            n_tokens = len(self.tokenizer.encode(thinking))
            return CleanOutcome(edit=remove_spans(thinking, []), raw_output=f"keep {self.keep_lines} of {n_tokens}")

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(Throwaway)
    server, tokenizer_dir, data = counting_setup
    hashes = {}
    for keep in ("2", "5"):
        out = tmp_path / f"out{keep}.jsonl"
        command = runner_command(server, tokenizer_dir, data, out)[2:]
        assert main([*command, "--n-rollouts", "1", "--cleaner", "throwaway", "--throwaway-keep-lines", keep]) == 0
        manifest = json.loads(manifest_path(out).read_text())
        assert manifest["settings"]["cleaner"] == {"name": "throwaway", "keep_lines": int(keep)}
        assert manifest["mode"] == "throwaway"
        records = read_rollouts(out)
        assert {r.config_hash for r in records} == {manifest["config_hash"]} and {r.mode for r in records} == {
            "throwaway"
        }
        cleanings = [rnd.clean for r in records for rnd in r.rounds if rnd.clean is not None]
        assert cleanings and all(c.cleaner == "throwaway" for c in cleanings)
        assert all(c.raw_output.startswith(f"keep {keep} of ") for c in cleanings)  # the flag built the instance
        hashes[keep] = manifest["config_hash"]
    assert hashes["2"] != hashes["5"]
