"""Evaluation outputs: refused when they are one of the inputs, and written whole or not at all.

Before: ``eval_passk.py --output run.jsonl`` (or ``--markdown run.jsonl``)
overwrote the rollouts it had just graded and exited 0, and metrics written to
a full disk left 4,096 bytes of invalid JSON where the previous
``metrics.json`` had been, with a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from repo_paths import EVAL_FIXTURES, REPO

from freelm.evaluation import eval_cli, judge_cli, report_cli
from freelm.testing.openai_chat_server import OpenAIChatTestServer


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def run_file(tmp_path) -> Path:
    path = tmp_path / "run.jsonl"
    shutil.copy(EVAL_FIXTURES / "vanilla.jsonl", path)
    return path


def aliases(tmp_path: Path, run: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra eval arguments, the flag refused)."""
    (tmp_path / "link.jsonl").symlink_to(run)
    os.link(run, tmp_path / "hard.jsonl")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "peak_context.png").symlink_to(run)
    return {
        "output": (["--output", str(run)], "--output"),
        "markdown": (["--markdown", str(run)], "--markdown"),
        "output_via_symlink": (["--output", str(tmp_path / "link.jsonl")], "--output"),
        "output_hard_link": (["--output", str(tmp_path / "hard.jsonl")], "--output"),
        "output_relative_spelling": (["--output", str(run.parent / "." / run.name)], "--output"),
        "a_plot_via_symlink": (["--plots-dir", str(tmp_path / "plots")], "--plots-dir (peak_context.png)"),
        "output_is_the_data": (["--data", str(EVAL_FIXTURES / "problems.jsonl"), "--output", str(tmp_path / "data.jsonl")],
                               "--output"),
        "markdown_is_the_output": (["--output", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.json")],
                                   "--markdown"),
    }  # fmt: skip


CASES = (
    "output",
    "markdown",
    "output_via_symlink",
    "output_hard_link",
    "output_relative_spelling",
    "a_plot_via_symlink",
    "output_is_the_data",
    "markdown_is_the_output",
)


@pytest.mark.parametrize("case", CASES)
def test_eval_refuses_an_output_that_is_an_input(case, tmp_path, run_file, capsys):
    if case == "output_is_the_data":  # the data file copied in, then named as the output
        shutil.copy(EVAL_FIXTURES / "problems.jsonl", tmp_path / "data.jsonl")
    extra, flag = aliases(tmp_path, run_file)[case]
    if case == "output_is_the_data":
        extra = ["--data", str(tmp_path / "data.jsonl"), "--output", str(tmp_path / "data.jsonl")]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert eval_cli.run(parse(eval_cli, ["--input", str(run_file), "--no-progress", *extra])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flag} ") and "is the same file as" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_eval_refuses_an_output_that_is_one_of_a_runs_shards(tmp_path, capsys):
    for index in range(2):  # a run given by its un-sharded name stands for its shard files
        (tmp_path / f"x.shard-{index}-of-2.jsonl").write_text("")
    shard = tmp_path / "x.shard-1-of-2.jsonl"
    assert eval_cli.run(parse(eval_cli, ["--input", str(tmp_path / "x.jsonl"), "--output", str(shard)])) == 2
    assert f"--output {shard} is the same file as --input {shard}" in capsys.readouterr().err


def test_judge_refuses_a_cache_that_is_an_input(run_file, capsys):
    args = parse(judge_cli, ["--input", str(run_file), "--output", str(run_file), "--base-url", "http://127.0.0.1:9/v1",
                             "--model", "judge", "--no-progress"])  # fmt: skip
    before = run_file.read_bytes()
    assert judge_cli.run(args) == 2
    assert f"--output {run_file} is the same file as --input {run_file}" in capsys.readouterr().err
    assert run_file.read_bytes() == before


@pytest.mark.parametrize("flag", ["--output", "--markdown"])
def test_report_refuses_an_output_that_is_an_input(flag, run_file, capsys):
    before = run_file.read_bytes()
    args = parse(report_cli, ["--input", str(run_file), "--model", "qwen3-8b", flag, str(run_file)])
    assert report_cli.run(args) == 2
    assert f"{flag} {run_file} is the same file as --input {run_file}" in capsys.readouterr().err
    assert run_file.read_bytes() == before


def test_an_output_through_a_symlink_replaces_the_file_it_names(tmp_path, run_file):
    target = tmp_path / "elsewhere.json"
    target.write_text("old")
    (tmp_path / "metrics.json").symlink_to(target)
    args = parse(
        report_cli, ["--input", str(run_file), "--model", "qwen3-8b", "--output", str(tmp_path / "metrics.json")]
    )
    assert report_cli.run(args) == 0
    assert (tmp_path / "metrics.json").is_symlink() and json.loads(target.read_text())["runs"]


# --------------------------------------------------------------------------- a write that fails


def full_disk_mkstemp(monkeypatch):
    """Every temp file the atomic writer opens is /dev/full: its first real write fails with ENOSPC."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_metrics_on_a_full_disk_keep_the_previous_file(tmp_path, run_file, monkeypatch, capsys):
    metrics = tmp_path / "metrics.json"
    args = parse(eval_cli, ["--input", str(run_file), "--output", str(metrics), "--markdown", str(tmp_path / "t.md"),
                            "--no-progress"])  # fmt: skip
    assert eval_cli.run(args) == 0
    previous = metrics.read_bytes()
    capsys.readouterr()
    full_disk_mkstemp(monkeypatch)
    assert eval_cli.run(args) == 1
    err = capsys.readouterr().err
    assert (
        err
        == f"error: the disk is full while writing {metrics} (No space left on device): {metrics} was left as it was\n"
    )
    assert metrics.read_bytes() == previous and json.loads(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "run.jsonl", "t.md"]  # no temp file left


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))  # past it a write fails (EFBIG); SIGXFSZ is ignored
from freelm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def limited(limit: int, *argv: str) -> subprocess.CompletedProcess:
    """``freelm ARGV`` in a process whose every file write stops at ``limit`` bytes: the kernel refuses the rest."""
    code = LIMITED.format(limit=limit)
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_metrics_past_the_kernels_file_size_limit_keep_the_previous_file(tmp_path, run_file):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"previous": "metrics"}\n')
    done = limited(1000, "eval", "--input", str(run_file), "--output", str(metrics), "--no-progress")
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: the file reached the size limit of this process (ulimit -f) while writing {metrics} (File too large): {metrics} was left as it was"
    )
    assert "Traceback" not in done.stderr
    assert metrics.read_text() == '{"previous": "metrics"}\n'


def test_a_judge_cache_past_the_file_size_limit_keeps_its_verdicts_and_resumes(tmp_path, run_file):
    cache = tmp_path / "judge.jsonl"
    argv = ["judge", "--input", str(run_file), "--data", str(EVAL_FIXTURES / "problems.jsonl"), "--model", "judge",
            "--output", str(cache), "--concurrency", "3", "--no-progress"]  # fmt: skip
    with OpenAIChatTestServer("\\boxed{Correct}", model="judge") as server:
        argv += ["--base-url", server.base_url]
        done = limited(600, *argv)  # room for a few verdict lines, not all of them
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        last = done.stderr.splitlines()[-1]
        assert last.startswith(
            f"error: the file reached the size limit of this process (ulimit -f) while writing {cache}"
        )
        kept = [line for line in cache.read_text().splitlines(keepends=True) if line.endswith("\n")]
        assert kept and all(json.loads(line) for line in kept)  # every complete line written before the failure
        done = subprocess.run([sys.executable, "-m", "freelm.cli", *argv], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr
    lines = cache.read_text().splitlines(keepends=True)
    assert lines[: len(kept)] == kept  # what was written before stays
    assert len(lines) == 8 and len({json.loads(line)["answer"] for line in lines}) == 8  # each verdict once
