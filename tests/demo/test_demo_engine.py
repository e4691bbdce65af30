"""``freelm demo --engine``: which runner flags each engine gets, and a clear stop when vLLM is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from freelm.demo.flags import runner_args
from freelm.demo.run import serving

ASSETS = Path("A")


def test_the_local_engine_is_the_in_process_backend_and_says_so():
    with serving("local", ASSETS) as (engine, served_by):
        assert engine == ["--backend", "local", "--model", "A/base", "--adapter", "A/free"]
        assert "in-process" in served_by
    args = runner_args(ASSETS, Path("d.jsonl"), Path("o.jsonl"), "free", 216, 4, ["--backend", "vllm"])
    assert args[args.index("--backend") + 1] == "vllm" and "--model" not in args


def test_vllm_without_its_venv_stops_with_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FREELM_VLLM_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(SystemExit, match="bash scripts/setup_vllm.sh"):
        with serving("vllm", ASSETS):
            pass
