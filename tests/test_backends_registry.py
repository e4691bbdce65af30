"""The backend registry: each kind is one module of freelm/backends/; choices, flags, checks and construction follow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import freelm.backends as backends
from freelm import discovery
from freelm.backends import backend_kinds, get_backend_kind, make_backend
from freelm.backends.openai_compat import OpenAIBackend
from freelm.backends.sglang import SGLangBackend
from freelm.manifest import manifest_path
from freelm.records import read_rollouts
from freelm.run.cli import main
from freelm.run.flags import build_parser
from freelm.run.spec import RunSpec
from freelm.testing.counting import CountingBackend, counting_answer

TARGET = 30
ROOT = Path(__file__).resolve().parents[1]


def spec(*flags: str) -> RunSpec:
    return RunSpec.from_argv(["--data", "d.jsonl", "--output", "o.jsonl", *flags])


def test_every_backend_module_registers_its_kind_and_the_choices_follow():
    assert list(backend_kinds()) == ["sglang", "openai", "local"]
    assert get_backend_kind("sglang").factory is SGLangBackend and get_backend_kind("openai").factory is OpenAIBackend
    choices = {a.dest: a.choices for a in build_parser()._actions if a.dest in ("backend", "cleaner_backend")}
    assert choices == {"backend": ["sglang", "openai", "local"], "cleaner_backend": ["sglang", "openai"]}
    with pytest.raises(ValueError, match="unknown backend kind 'vllm'; expected one of sglang, openai, local"):
        get_backend_kind("vllm")


def test_discovery_never_imports_torch_nor_the_openai_sdk():
    """Building the parser discovers every kind; only the kind that is built may import its heavy modules."""
    code = (
        "import sys; from freelm.run.flags import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'openai', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_runner_flags_become_constructor_arguments():
    flags = spec("--endpoint", "h:1", "--served-model", "m", "--timeout", "7", "--concurrency", "600")
    assert flags.backend_options == {"served_model": "m", "text_prompts": False, "api_key_env": "OPENAI_API_KEY"}
    assert get_backend_kind("openai").options(flags, "http://h:1", None) == {
        "base_url": "http://h:1/v1", "model": "m", "api_key_env": "OPENAI_API_KEY", "timeout": 7.0, "max_retries": 0,
        "text_prompts": False, "decode": None,
    }  # fmt: skip
    assert get_backend_kind("openai").options(flags, "https://h:1/api/v1", None)["base_url"] == "https://h:1/api/v1"
    assert get_backend_kind("sglang").options(flags, "http://h:1", None)["max_connections"] == 600
    local = spec("--backend", "local", "--model", "m", "--adapter", "a", "--adapter-name", "f", "--concurrency", "3")
    assert get_backend_kind("local").options(local, None, None) == {
        "model_dir": Path("m"),
        "max_batch": 3,
        "adapters": {"f": Path("a")},
    }


#: A whole backend kind in one file, with a flag of its own, as a contributor would add it to freelm/backends/.
COUNTING_KIND = '''
"""A throwaway in-process kind: the counting model of freelm.testing.counting."""

from freelm.backends import BackendFlag, BackendKind, register_backend
from freelm.testing.counting import CountingBackend, counting_tokenizer


def _options(spec, url, tokenizer):
    target = spec.backend_options["count_target"]
    return {"tokenizer": counting_tokenizer(target), "target": target}


register_backend(
    BackendKind(
        "counting", CountingBackend, remote=False, options=_options, help="the counting model",
        flags=(BackendFlag("--count-target", "--backend counting: the number it counts to", {"type": int, "default": 30, "metavar": "N"}),),
    )
)
'''


@pytest.fixture
def counting_kind(tmp_path, monkeypatch):
    """``counting.py`` dropped into the package's path: discovered like any file of freelm/backends/."""
    folder = tmp_path / "more_backends"
    folder.mkdir()
    (folder / "counting_kind.py").write_text(textwrap.dedent(COUNTING_KIND))
    monkeypatch.setattr(backends, "__path__", [*backends.__path__, str(folder)])
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(discovery, "_imported", set())  # walk the package's path again
    monkeypatch.delitem(sys.modules, "freelm.backends.counting_kind", raising=False)
    yield
    sys.modules.pop("freelm.backends.counting_kind", None)


def test_a_new_kind_is_one_file_and_runs_through_runner_py(counting_kind, tmp_path, capsys):
    """The file alone: --backend offers it, its flag exists, the in-process checks apply, its rollouts run."""
    assert list(backend_kinds()) == ["sglang", "openai", "local", "counting"]
    parser = build_parser()
    assert "counting" in next(a for a in parser._actions if a.dest == "backend").choices
    text = " ".join(parser.format_help().split())
    assert "--count-target N --backend counting: the number it counts to" in text
    assert "counting = the counting model" in text
    data, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "prompt": f"Count to {TARGET}.", "answer": str(TARGET)}) + "\n" for i in range(2))
    )
    common = ["--data", str(data), "--output", str(out), "--n-rollouts", "1", "--no-progress", "--backend", "counting"]
    assert main([*common]) == 2 and "--backend counting needs --model DIR" in capsys.readouterr().err
    model = tmp_path / "model"
    flags = ["--model", str(model), "--cleaner", "headtail", "--head-tokens", "4", "--tail-tokens", "8"]
    budgets = ["--clean-every", "20", "--context-limit", "400", "--max-tokens", "600"]
    assert main([*common, *flags, *budgets, "--count-target", str(TARGET)]) == 0
    records = read_rollouts(out)
    assert len(records) == 2 and all(r.response.endswith(counting_answer(TARGET)) for r in records)
    assert all(r.mode == "headtail" and r.cleaning_rounds > 0 for r in records)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["settings"]["model"]["model"] == str(model.resolve())  # in-process kinds hash their weights
    assert manifest["config"]["count_target"] == TARGET
    built = make_backend("counting", **get_backend_kind("counting").options(spec("--count-target", "5"), None, None))
    assert isinstance(built, CountingBackend) and built.target == 5


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    sglang = get_backend_kind("sglang")
    assert backends.register_backend(sglang) is sglang  # the same kind again (a re-import): fine
    with pytest.raises(ValueError, match="backend name 'sglang' is taken"):
        backends.register_backend(backends.BackendKind("sglang", OpenAIBackend, remote=True, options=sglang.options))
