"""Careless or hostile bytes in JSON lines: every consumer of the one reader gets the usual file:line error.

A line nested 100,000 deep made Python's decoder raise RecursionError, which no
reader caught (they caught ValueError): the data file, an output being resumed,
``eval_passk.py``'s input and the judge's cache each crashed with a traceback.
The reader (``iter_jsonl``) and the torn-tail repair now turn it into a bad
line like any other; the manifest reader, which is advisory, ignores it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from freelm.data import load_problems
from freelm.evaluation import eval_cli
from freelm.evaluation.judgments import read_judgments
from freelm.jsonl import iter_jsonl, repair_torn_tail
from freelm.manifest import manifest_path, read_manifest
from freelm.run.cli import main as runner_main

DEEP = "[" * 100_000 + "]" * 100_000
TOO_DEEP = "not valid JSON (nested too deep to read (arrays or objects about 1,000 levels deep))"


def lines(path: Path, *rows: str) -> Path:
    path.write_text("".join(row + "\n" for row in rows))
    return path


def test_the_reader_names_file_and_line_of_a_line_nested_too_deep(tmp_path):
    path = lines(tmp_path / "x.jsonl", '{"a": 1}', '{"deep": ' + DEEP + "}", '{"b": 2}')
    with pytest.raises(ValueError) as caught:
        list(iter_jsonl(path))
    assert str(caught.value) == f"{path}:2: {TOO_DEEP}"
    assert list(iter_jsonl(lines(tmp_path / "ok.jsonl", '{"deep": ' + "[" * 500 + "]" * 500 + "}")))  # deep is fine


def test_a_torn_last_line_nested_too_deep_is_repaired_like_any_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\n' + DEEP)  # no newline: what a killed writer leaves
    assert [obj for _, obj in iter_jsonl(path)] == [{"a": 1}]
    assert repair_torn_tail(path) == len(DEEP)
    assert path.read_text() == '{"a": 1}\n'


def test_the_data_file(tmp_path):
    path = lines(tmp_path / "bench.jsonl", '{"id": 1, "prompt": "p"}', DEEP)
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON \(nested too deep"):
        load_problems(path)


def test_an_output_being_resumed(tmp_path, capsys):
    data = lines(tmp_path / "bench.jsonl", '{"id": 1, "prompt": "p"}')
    out = lines(tmp_path / "out.jsonl", DEEP)
    argv = ["--data", str(data), "--output", str(out), "--endpoint", "127.0.0.1:9", "--tokenizer", str(tmp_path)]
    assert runner_main([*argv, "--no-progress", "--down-wait", "1"]) == 2
    assert capsys.readouterr().err == f"error: {out}:1: {TOO_DEEP}\n"


def test_eval_passk_input(tmp_path, capsys):
    run = lines(tmp_path / "run.jsonl", '{"id": 1, "source": "s", "response": "\\\\boxed{1}"}', DEEP)
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    assert eval_cli.run(parser.parse_args(["--input", f"r={run}", "--output", str(tmp_path / "m.json")])) == 2
    assert capsys.readouterr().err == f"error: {run}:2: {TOO_DEEP}\n"


def test_the_judge_cache(tmp_path):
    cache = lines(tmp_path / "judge.jsonl", DEEP)
    with pytest.raises(ValueError, match=rf"^{cache}:1: not valid JSON \(nested too deep"):
        read_judgments(cache)


def test_a_manifest_nested_too_deep_is_ignored_like_any_unreadable_one(tmp_path):
    out = tmp_path / "out.jsonl"
    manifest_path(out).write_text(json.dumps({"a": 1})[:-1] + ', "deep": ' + DEEP + "}")
    assert read_manifest(out) is None
