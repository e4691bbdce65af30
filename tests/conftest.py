"""Shared fixtures: a tiny Qwen3 on disk, its tokenizer, an overfit "free" LoRA, and servers over them.

Everything is built from scratch in a session tmp dir (no downloads) with one
torch thread. torch is imported inside fixtures only, so torch-free test files
collect fast.

Reusable names:

* ``tiny_model_dir`` / ``tiny_tokenizer``: the checkpoint directory and its :class:`Tokenizer`.
* ``free_example``: the one cleaning prompt the adapter was overfit on and its target JSON.
* ``free_adapter_dir``: a PEFT adapter dir (saved as "default", load it under any name, e.g. "free")
  whose greedy output on ``free_example.prompt_ids`` is exactly ``free_example.target_ids``
  (target JSON + ``<|im_end|>``); with the adapter off the output differs.
* ``local_backend``: ``LocalBackend`` with the adapter loaded as "free" (session-wide; tests flush its cache).
* ``local_sglang_server``: an ``SGLangTestServer`` over ``local_backend``, counters/faults reset per test.
* ``drop_module``: ``drop_module(package, registry, name, source)`` puts ``source`` in as one more module of a
  registry's package (freelm/backends/, freelm/cleaners/), discovered like any file of it, for this test only.
* ``counting_kind``: a whole in-process backend kind in one dropped file (``--backend counting``, the counting
  model of :mod:`freelm.testing.counting`, with a flag of its own), as a contributor would add it.

Test tiers: every test is marked ``torch`` and/or ``server`` (a subprocess or an
HTTP server) from what it uses, read off its source, the sources of its
fixtures and of the test-file helpers they call (``classify``); the rest is
marked ``fast``. ``pytest --fast`` (``bash scripts/test.sh --fast``) runs only
those, and fails a test the classifier got wrong (it started a process, bound
a socket or imported torch), so a new test is classified without anyone
remembering to mark it.
"""

from __future__ import annotations

import inspect
import os
import platform
import re
import socketserver
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# What puts a test in a tier (names a test, its fixtures or its helpers use).
NEEDS_TORCH = re.compile(
    r"\b(torch|tinymodel|build_tiny_model|LocalBackend|transformers|peft|safetensors|trainer|"
    r"tiny_model_dir|tiny_tokenizer|free_adapter_dir|local_backend)\b"
)
NEEDS_SERVER = re.compile(
    r"\b(subprocess|Popen|multiprocessing|ProcessPool\w*|GraderPool|AnswerGrader|\w*TestServer|\w*HTTPServer|"
    r"http_server|local_sglang_server|start_server\w*|VLLMServer|vllm_server|run_runner)\b"
)
#: What a fast test must not do at run time: start a process (``sys.addaudithook`` events) or a server.
SLOW_EVENTS = ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec")


def _sources(obj: object, seen: set[int], depth: int = 0) -> list[str]:
    """The source of ``obj`` and of the same-file functions and classes it names, a few levels deep."""
    if id(obj) in seen or depth > 4:
        return []
    seen.add(id(obj))
    try:
        out = [inspect.getsource(obj)]
    except (OSError, TypeError):
        return []
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    names: set[str] = set()
    codes = [getattr(obj, "__code__", None)]
    if isinstance(obj, type):
        codes += [getattr(member, "__code__", None) for member in vars(obj).values()]
    while codes:
        code = codes.pop()
        if isinstance(code, types.CodeType):
            names.update(code.co_names)
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    for name in sorted(names):
        ref = getattr(module, name, None)
        if (inspect.isfunction(ref) or inspect.isclass(ref)) and ref.__module__ == obj.__module__:
            out += _sources(ref, seen, depth + 1)
    return out


def classify(item: pytest.Item) -> set[str]:
    """``{"torch", "server"}``, a subset, or ``{"fast"}``: what this test needs, from the code it runs."""
    seen: set[int] = set()
    texts = [" ".join(item.fixturenames), *_sources(getattr(item, "function", None), seen)]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        for fixturedef in defs:
            texts += _sources(fixturedef.func, seen)
    text = "\n".join(texts)
    tiers = {tier for tier, needs in (("torch", NEEDS_TORCH), ("server", NEEDS_SERVER)) if needs.search(text)}
    return tiers or {"fast"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fast", action="store_true", help="only tests that need neither torch nor a subprocess/HTTP server"
    )


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in (("fast", "needs neither torch nor a server"), ("torch", "needs torch"),
                       ("server", "starts a subprocess or an HTTP server")):  # fmt: skip
        config.addinivalue_line("markers", f"{tier}: {what} (set by tests/conftest.py, never by hand)")
    if config.getoption("--fast"):
        platform.processor()  # runs `uname -p` once and caches it: not the test's subprocess (manifests ask)
        sys.addaudithook(lambda event, args: _record(event) if event in SLOW_EVENTS else None)
        activate = socketserver.TCPServer.server_activate  # every http.server server listens through it

        def server_activate(self) -> None:
            _record("an HTTP server")
            activate(self)

        socketserver.TCPServer.server_activate = server_activate


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        tiers = classify(item)
        for tier in tiers:
            item.add_marker(tier)
        (keep if "fast" in tiers else drop).append(item)
    if config.getoption("--fast") and drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


_events: list[str] | None = None  # recording while a --fast test runs


def _record(what: str) -> None:
    if _events is not None:
        _events.append(what)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    global _events
    if not item.config.getoption("--fast"):
        return (yield)
    had_torch, _events = "torch" in sys.modules, []
    try:
        result = yield
    finally:
        used, _events = sorted(set(_events)), None
    if not had_torch and "torch" in sys.modules:
        used.append("import torch")
    if used:
        pytest.fail(
            f"classified fast by tests/conftest.py but it used {', '.join(used)}: extend NEEDS_TORCH/NEEDS_SERVER"
        )
    return result


FREE_PROBLEM = "What is 12 + 30?"
FREE_THINKING = "First, compute the sum: 12 + 30 = 42. Wait, check again. 12 + 30 = 42. So the answer is 42."
FREE_TARGET = '[{"prefix": "Wait, check", "suffix": "again."}]'


@dataclass(frozen=True)
class CleaningExample:
    problem: str
    thinking: str
    prompt: str
    prompt_ids: list[int]
    target: str  # the JSON deletion list
    target_ids: list[int]  # target tokens + the eos token, what greedy decoding must emit


@pytest.fixture(scope="session")
def torch_one_thread():
    import torch

    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, torch_one_thread) -> Path:
    from freelm.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=[FREE_THINKING, FREE_TARGET])


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from freelm.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def free_example(tiny_tokenizer) -> CleaningExample:
    from freelm.prompts import render_cleaning_prompt
    from freelm.tinymodel import EOS_TOKEN

    prompt = render_cleaning_prompt(FREE_PROBLEM, FREE_THINKING)
    eos_id = tiny_tokenizer.hf.convert_tokens_to_ids(EOS_TOKEN)
    return CleaningExample(
        problem=FREE_PROBLEM,
        thinking=FREE_THINKING,
        prompt=prompt,
        prompt_ids=tiny_tokenizer.encode(prompt),
        target=FREE_TARGET,
        target_ids=tiny_tokenizer.encode(FREE_TARGET) + [eos_id],
    )


@pytest.fixture(scope="session")
def free_adapter_dir(tmp_path_factory, tiny_model_dir, free_example, torch_one_thread) -> Path:
    """Overfit a LoRA (r=16, all-linear, AdamW lr 1e-2) on the one example until greedy decoding reproduces it."""
    torch = torch_one_thread
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    ids = torch.tensor([free_example.prompt_ids + free_example.target_ids])
    labels = torch.tensor([[-100] * len(free_example.prompt_ids) + free_example.target_ids])
    target = labels[0, 1:]
    mask = target != -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def argmax_matches() -> bool:
        """Teacher-forced argmax == target everywhere <=> greedy decoding emits exactly the target."""
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        return bool((logits.argmax(-1)[mask] == target[mask]).all())

    for step in range(1, 101):
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        if step >= 10 and step % 5 == 0 and argmax_matches():
            break
    else:
        pytest.fail(f"the LoRA did not overfit the cleaning example in 100 steps (loss {loss.item():.3f})")
    with model.disable_adapter():
        assert not argmax_matches(), "the base model already emits the target: adapter on/off would be untestable"
    out = tmp_path_factory.mktemp("adapter") / "free"
    model.save_pretrained(out)  # PEFT writes adapter "default" at the top of ``out`` (others in a subfolder)
    return out


@pytest.fixture(scope="session")
def local_backend(tiny_model_dir, free_adapter_dir, torch_one_thread):
    from freelm.backends.local import LocalBackend

    return LocalBackend.from_pretrained(tiny_model_dir, adapters={"free": free_adapter_dir}, threads=1)


@pytest.fixture(scope="module")
def embedded_backend(torch_one_thread):
    """``LocalBackend`` over the embedded default's trained model and Free-Module (batches of 8), one per module.

    A trained model has confident logits, so "batched greedy == one-by-one greedy" is a real equality on it.
    """
    from repo_paths import EMBEDDED

    from freelm.backends.local import LocalBackend

    return LocalBackend.from_pretrained(EMBEDDED / "base", {"free": EMBEDDED / "free"}, max_batch=8)


@pytest.fixture(scope="session")
def _local_sglang_server_session(local_backend, tiny_model_dir):
    from freelm.testing.sglang_server import SGLangTestServer

    # served as scripts/serve_sglang.sh serves: --enable-cache-report (cached_tokens on the OpenAI route too)
    with SGLangTestServer(
        local_backend, served_model_name="tiny", model_path=str(tiny_model_dir), cache_report=True
    ) as server:
        yield server


@pytest.fixture
def local_sglang_server(_local_sglang_server_session, local_backend):
    """The session server with fresh counters, no queued faults and an empty KV cache."""
    _local_sglang_server_session.reset()
    local_backend.flush_cache()
    return _local_sglang_server_session


@pytest.fixture
def drop_module(tmp_path, monkeypatch):
    """See the module docstring: the registry and the discovery state are restored after the test."""
    from freelm import discovery

    added: list[str] = []

    def drop(package: types.ModuleType, registry: types.ModuleType, name: str, source: str) -> None:
        folder = tmp_path / f"more_{package.__name__.rsplit('.', 1)[-1]}"
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        if str(folder) not in package.__path__:
            monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
        monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
        monkeypatch.setattr(discovery, "_imported", set())  # walk the package's path again
        added.append(f"{package.__name__}.{name}")
        sys.modules.pop(added[-1], None)

    yield drop
    for module in added:
        sys.modules.pop(module, None)


#: A whole backend kind in one file, with a flag of its own, as a contributor would add it to freelm/backends/.
COUNTING_KIND = '''
"""A throwaway in-process kind: the counting model of freelm.testing.counting."""

from freelm.backends import BackendFlag, BackendKind, register_backend
from freelm.testing.counting import CountingBackend, counting_tokenizer


def _options(args):
    target = args.flags["count_target"]
    return {"tokenizer": counting_tokenizer(target), "target": target}


register_backend(
    BackendKind(
        "counting", CountingBackend, remote=False, options=_options, help="the counting model",
        flags=(BackendFlag("--count-target", "--backend counting: the number it counts to", {"type": int, "default": 30, "metavar": "N"}),),
    )
)
'''


@pytest.fixture
def counting_kind(drop_module):
    import freelm.backends as backends

    drop_module(backends, backends, "counting_kind", COUNTING_KIND)
