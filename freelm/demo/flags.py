"""The runner flags of the demo's runs: the settings the embedded default was built and measured with.

Shared by ``freelm demo`` (:mod:`freelm.demo.run`), the resume strategies'
measurement (:mod:`freelm.demo.strategies`), ``bench/vllm_bench.py`` and the vLLM
tier of ``tests/realserver``; docs/embedded.md, "Demo settings". The engine is a
set of runner flags: the in-process backend (the default) or a vLLM server.
"""

from __future__ import annotations

from pathlib import Path

from freelm.demo.corpus import CLEAN_TEMPLATE

CLEAN_EVERY = 32
MAX_TOKENS = 512
CLEAN_MAX_TOKENS = 48
#: Rollouts in flight; the in-process backend decodes their requests as one batch (freelm/backends/local.py).
CONCURRENCY = 16


def local_engine(assets: Path) -> list[str]:
    """The runner flags of the in-process engine serving the embedded model and its Free-Module."""
    return ["--backend", "local", "--model", str(assets / "base"), "--adapter", str(assets / "free")]


def vllm_engine(assets: Path, endpoint: str) -> list[str]:
    """The runner flags of a vLLM server at ``endpoint`` serving them (the Free-Module as ``free``)."""
    return ["--backend", "vllm", "--endpoint", endpoint, "--tokenizer", str(assets / "base")]


def runner_args(
    assets: Path,
    data: Path,
    output: Path,
    cleaner: str | None,
    context_limit: int,
    limit: int,
    engine: list[str] | None = None,
    *,
    accept_unusable_cleaning: bool = False,
) -> list[str]:
    """``freelm run`` at the demo's settings; ``engine``: the backend flags (default: :func:`local_engine`)."""
    method = ["--mode", "vanilla"] if cleaner is None else ["--mode", "freelm", "--cleaner", cleaner]
    if accept_unusable_cleaning:
        method.append("--accept-unusable-cleaning")
    return [
        "run", "--data", str(data), "--limit", str(limit), "--output", str(output), "--n-rollouts", "1",
        "--seed", "0", *(engine or local_engine(assets)),
        *method, "--clean-template", str(CLEAN_TEMPLATE), "--clean-max-tokens", str(CLEAN_MAX_TOKENS),
        "--clean-every", str(CLEAN_EVERY), "--max-tokens", str(MAX_TOKENS), "--context-limit", str(context_limit),
        "--temperature", "0", "--top-p", "1", "--top-k", "-1", "--concurrency", str(CONCURRENCY),
    ]  # fmt: skip
