"""The backend table: --backend / --cleaner-backend choices, flag checks and construction all read BACKENDS."""

from __future__ import annotations

import argparse
import json

import pytest

from freelm.backends import BACKENDS, BackendKind, get_backend_kind, make_backend
from freelm.manifest import manifest_path
from freelm.records import read_rollouts
from freelm.runner import main
from freelm.runner_config import add_arguments
from freelm.testing.counting import CountingBackend, counting_answer

TARGET = 30


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--data", "d.jsonl", "--output", "o.jsonl", *flags])


def test_choices_come_from_the_table():
    assert list(BACKENDS) == ["sglang", "openai", "local"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    choices = {a.dest: a.choices for a in parser._actions if a.dest in ("backend", "cleaner_backend")}
    assert choices == {"backend": ["sglang", "openai", "local"], "cleaner_backend": ["sglang", "openai"]}
    with pytest.raises(ValueError, match="unknown backend kind 'vllm'; expected one of sglang, openai, local"):
        get_backend_kind("vllm")


def test_runner_flags_become_constructor_arguments():
    args = parse("--endpoint", "h:1", "--served-model", "m", "--timeout", "7", "--concurrency", "600")
    assert BACKENDS["openai"].options(args, "http://h:1", None) == {
        "base_url": "http://h:1/v1", "model": "m", "api_key_env": "OPENAI_API_KEY", "timeout": 7.0, "max_retries": 0,
        "text_prompts": False, "decode": None,
    }  # fmt: skip
    assert BACKENDS["openai"].options(args, "https://h:1/api/v1", None)["base_url"] == "https://h:1/api/v1"
    assert BACKENDS["sglang"].options(args, "http://h:1", None)["max_connections"] == 600


def test_a_new_kind_is_one_table_entry_and_runs_through_runner_py(tmp_path, monkeypatch, capsys):
    """An in-process kind added to BACKENDS: --backend offers it, the local-only checks apply, its rollouts run."""
    from freelm.testing.counting import counting_tokenizer

    tokenizer = counting_tokenizer(TARGET)
    kind = BackendKind(
        "counting", "freelm.testing.counting:CountingBackend", remote=False, help="the counting model",
        options=lambda args, url, _tokenizer: {"tokenizer": tokenizer, "target": TARGET},
    )  # fmt: skip
    monkeypatch.setitem(BACKENDS, "counting", kind)
    assert isinstance(make_backend("counting", tokenizer=tokenizer, target=TARGET), CountingBackend)
    data, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "prompt": f"Count to {TARGET}.", "answer": str(TARGET)}) + "\n" for i in range(2))
    )
    common = ["--data", str(data), "--output", str(out), "--n-rollouts", "1", "--no-progress", "--backend", "counting"]
    assert main([*common]) == 2 and "--backend counting needs --model DIR" in capsys.readouterr().err
    model = tmp_path / "model"
    flags = ["--model", str(model), "--cleaner", "headtail", "--head-tokens", "4", "--tail-tokens", "8"]
    assert main([*common, *flags, "--clean-every", "20", "--context-limit", "400", "--max-tokens", "600"]) == 0
    records = read_rollouts(out)
    assert len(records) == 2 and all(r.response.endswith(counting_answer(TARGET)) for r in records)
    assert all(r.mode == "headtail" and r.cleaning_rounds > 0 for r in records)
    settings = json.loads(manifest_path(out).read_text())["settings"]
    assert settings["model"]["model"] == str(model.resolve())  # in-process kinds hash their weights
