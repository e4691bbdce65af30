"""The backend registry: each kind is one module of freelm/backends/; choices, flags, checks and construction follow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from repo_paths import REPO

import freelm.backends as backends
from freelm.backends import BackendArgs, BackendKind, backend_kinds, get_backend_kind
from freelm.backends.base import missing_members
from freelm.backends.openai_compat import OpenAIBackend
from freelm.backends.sglang import SGLangBackend
from freelm.manifest import manifest_path
from freelm.records import read_rollouts
from freelm.run.cli import main
from freelm.run.components import backend_args
from freelm.run.flags import build_parser
from freelm.run.spec import RunSpec
from freelm.testing.counting import CountingBackend, counting_answer

TARGET = 30


def spec(*flags: str) -> RunSpec:
    return RunSpec.from_argv(["--data", "d.jsonl", "--output", "o.jsonl", *flags])


def test_every_backend_module_registers_its_kind_and_the_choices_follow():
    assert list(backend_kinds()) == ["sglang", "openai", "vllm", "local"]
    assert get_backend_kind("sglang").factory is SGLangBackend and get_backend_kind("openai").factory is OpenAIBackend
    choices = {a.dest: a.choices for a in build_parser()._actions if a.dest in ("backend", "cleaner_backend")}
    assert choices == {
        "backend": ["sglang", "openai", "vllm", "local"],
        "cleaner_backend": ["sglang", "openai", "vllm"],
    }
    with pytest.raises(ValueError, match="unknown backend kind 'tgi'; expected one of sglang, openai, vllm, local"):
        get_backend_kind("tgi")


def test_discovery_never_imports_torch_nor_the_openai_sdk():
    """Building the parser discovers every kind; only the kind that is built may import its heavy modules."""
    code = (
        "import sys; from freelm.run.flags import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'openai', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_run_builds_each_kind_a_plain_record_and_the_kind_picks_its_arguments(tmp_path):
    """Runner flags -> BackendArgs (the run package) -> factory keywords (the kind's own ``options``)."""
    flags = spec("--endpoint", "h:1", "--served-model", "m", "--timeout", "7", "--concurrency", "600")
    assert flags.backend_options == {"served_model": "m", "text_prompts": False, "api_key_env": "OPENAI_API_KEY"}
    openai, sglang, local = (get_backend_kind(name) for name in ("openai", "sglang", "local"))
    args = backend_args(flags, openai, "http://h:1")
    assert args == BackendArgs(
        url="http://h:1", timeout=7.0, max_retries=0, concurrency=600,
        flags={"served_model": "m", "text_prompts": False, "api_key_env": "OPENAI_API_KEY"},
    )  # fmt: skip
    assert openai.options(args) == {
        "base_url": "http://h:1/v1", "model": "m", "api_key_env": "OPENAI_API_KEY", "timeout": 7.0, "max_retries": 0,
        "text_prompts": False, "decode": None,
    }  # fmt: skip
    assert openai.options(backend_args(flags, openai, "https://h:1/api/v1"))["base_url"] == "https://h:1/api/v1"
    assert backend_args(flags, sglang, "http://h:1").flags == {}  # a kind sees its own flags only
    assert sglang.options(backend_args(flags, sglang, "http://h:1"))["max_connections"] == 600
    run = spec("--backend", "local", "--model", "m", "--adapter", "a", "--adapter-name", "f", "--concurrency", "3")
    assert local.options(backend_args(run, local)) == {
        "model_dir": Path("m"),
        "max_batch": 3,
        "adapters": {"f": Path("a")},
    }


def test_an_engine_loads_the_adapter_only_under_the_name_the_cleaner_calls_on_it():
    """The run package decides the adapters (the cleaner's declared ``adapter``): the backend reads no cleaner flag."""
    local = get_backend_kind("local")

    def adapters(*flags: str) -> dict:
        return dict(backend_args(spec("--backend", "local", "--model", "m", "--adapter", "a", *flags), local).adapters)

    assert adapters() == {"free": Path("a")}
    assert adapters("--adapter-name", "mine") == {"mine": Path("a")}
    assert adapters("--cleaner", "icl") == adapters("--cleaner", "headtail") == adapters("--mode", "vanilla") == {}
    assert adapters("--cleaner-endpoint", "h:1") == {}  # the cleaner calls other servers


def test_a_new_kind_is_one_file_and_runs_through_runner_py(counting_kind, tmp_path, capsys):
    """The file alone: --backend offers it, its flag exists, the in-process checks apply, its rollouts run."""
    assert list(backend_kinds()) == ["sglang", "openai", "vllm", "local", "counting"]
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
    counting = get_backend_kind("counting")
    built = counting.build(backend_args(spec("--backend", "counting", "--count-target", "5"), counting))
    assert isinstance(built, CountingBackend) and built.target == 5


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    sglang = get_backend_kind("sglang")
    assert backends.register_backend(sglang) is sglang  # the same kind again (a re-import): fine
    with pytest.raises(ValueError, match="backend name 'sglang' is taken"):
        backends.register_backend(backends.BackendKind("sglang", OpenAIBackend, remote=True, options=sglang.options))


#: A remote kind whose client forgets health(): it would silently lose hang detection and health probing.
FORGETFUL_KIND = """
from freelm.backends import BackendKind, register_backend
from freelm.backends.base import ServerLimits


class Forgetful:
    name = "forgetful"
    health_error = None

    async def generate(self, request): ...

    async def aclose(self): ...

    async def server_limits(self):
        return ServerLimits()

    async def startup_check(self, adapters, probe_ids=()):
        return {}


register_backend(BackendKind("forgetful", Forgetful, remote=True, options=lambda args: {}))
"""


def test_a_remote_kind_that_lacks_part_of_the_protocol_is_refused_by_name(drop_module):
    """At discovery (its file imported): the kind, the class and the missing method are named."""
    drop_module(backends, backends, "forgetful_kind", FORGETFUL_KIND)
    expected = r"backend kind 'forgetful' \(remote\): Forgetful lacks health\(\) of RemoteBackend"
    with pytest.raises(TypeError, match=expected):
        backend_kinds()


def test_a_factory_that_is_no_class_is_checked_on_what_it_builds(monkeypatch):
    """A function factory cannot be inspected at registration: what it returns is, before any use."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))

    class Engine:  # in-process, but with no tokenizer and no server_limits()
        name = "engine"

        async def generate(self, request): ...

        async def aclose(self): ...

    kind = backends.register_backend(BackendKind("engine", lambda: Engine(), remote=False, options=lambda args: {}))
    with pytest.raises(
        TypeError, match=r"'engine' \(in-process\): Engine lacks server_limits\(\), tokenizer of InProcessBackend"
    ):
        kind.build(BackendArgs())


def test_every_registered_kind_implements_its_interface():
    for kind in backend_kinds().values():
        if isinstance(kind.factory, type):
            assert missing_members(kind.factory, kind.interface) == [], kind.name
