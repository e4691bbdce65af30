"""The runner flags of the demo's runs: the settings the embedded default was built and measured with.

Shared by ``freelm demo`` (:mod:`freelm.demo.run`) and the resume strategies'
measurement (:mod:`freelm.demo.strategies`); docs/embedded.md, "Demo settings".
"""

from __future__ import annotations

from pathlib import Path

from freelm.demo.corpus import CLEAN_TEMPLATE

CLEAN_EVERY = 32
MAX_TOKENS = 512
CLEAN_MAX_TOKENS = 48
#: Rollouts in flight; the in-process backend decodes their requests as one batch (freelm/backends/local.py).
CONCURRENCY = 16


def runner_args(
    assets: Path,
    data: Path,
    output: Path,
    cleaner: str | None,
    context_limit: int,
    limit: int,
    *,
    accept_unusable_cleaning: bool = False,
) -> list[str]:
    method = ["--mode", "vanilla"] if cleaner is None else ["--mode", "freelm", "--cleaner", cleaner]
    if accept_unusable_cleaning:
        method.append("--accept-unusable-cleaning")
    return [
        "run", "--data", str(data), "--limit", str(limit), "--output", str(output), "--n-rollouts", "1",
        "--seed", "0", "--backend", "local", "--model", str(assets / "base"), "--adapter", str(assets / "free"),
        *method, "--clean-template", str(CLEAN_TEMPLATE), "--clean-max-tokens", str(CLEAN_MAX_TOKENS),
        "--clean-every", str(CLEAN_EVERY), "--max-tokens", str(MAX_TOKENS), "--context-limit", str(context_limit),
        "--temperature", "0", "--top-p", "1", "--top-k", "-1", "--concurrency", str(CONCURRENCY),
    ]  # fmt: skip
