"""The settings that decide a run's results, and their hash (stored in every output line).

Two kinds of flags: those that change what the model produces (mode, cleaner,
budgets, sampling, seed, a local model's weights) form :class:`RunSettings`, whose
hash is stored in every output line so resuming never mixes two experiments;
those that only change how fast it runs (endpoints, concurrency, timeouts,
retries) are deliberately left out, so a resume may use other servers. The hash
of a given flag set must never change: outputs written before must resume
(``tests/run/test_settings_hash.py`` pins values).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RunSettings:
    """What determines the results. ``mode`` is the record's label: vanilla, freelm, or the baseline's name."""

    mode: str
    seed: int
    loop: dict[str, Any]
    cleaner: dict[str, Any] | None
    model: dict[str, Any] | None  # local weights; a remote server's model is the operator's responsibility

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def config_hash(self) -> str:
        return settings_hash(self.to_dict())


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def settings_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["loop.clean_every: 4096 -> 2048", ...]``: what a refused resume would change."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(settings_differences(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def rollout_seed(seed: int, source: str, problem_id: str, rollout: int) -> int:
    """A stable per-rollout seed: independent of run order, concurrency and resumption."""
    digest = hashlib.sha256(f"{seed}\0{source}\0{problem_id}\0{rollout}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**31 - 1)
