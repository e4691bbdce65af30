"""The run manifest next to a runner output (``OUT.manifest.json``) and the files' naming.

The manifest answers "what produced this file?" long after the run: the full
config, the results-deciding settings and their hash, package versions, start
and end times, counts and the end summary. A resumed run keeps the earlier
invocations under ``previous_runs``. It is rewritten atomically (a temp file
unique to the writer + rename), so a kill at any moment leaves either the old
or the new manifest, never half of one, and every string in it is redacted
(:mod:`freelm.redact`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from freelm.jsonl import unique_temp
from freelm.redact import redact_obj

MANIFEST_VERSION = 1

#: Distributions whose versions can change results or behaviour (looked up without importing them).
TRACKED_PACKAGES = (
    "freelm",
    "torch",
    "transformers",
    "peft",
    "tokenizers",
    "httpx",
    "aiohttp",
    "openai",
    "math-verify",
)


def manifest_path(output: str | Path) -> Path:
    return Path(f"{output}.manifest.json")


def errors_path(output: str | Path) -> Path:
    return Path(f"{output}.errors.jsonl")


def lock_path(output: str | Path) -> Path:
    """Held (``fcntl.flock``) by the one runner writing ``output``: see :mod:`freelm.output_guard`."""
    return Path(f"{output}.lock")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def read_manifest(output: str | Path) -> dict[str, Any] | None:
    """The manifest of ``output``, or None when there is none (or it is unreadable: it is advisory)."""
    path = manifest_path(output)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested ~1,000 deep (careless hands)
        return None
    return data if isinstance(data, dict) else None


def write_manifest(output: str | Path, manifest: dict[str, Any]) -> Path:
    """Atomic rewrite with every string redacted (a command line or an endpoint's last error may hold a key)."""
    path = manifest_path(output)
    with unique_temp(path) as (f, tmp):
        payload = redact_obj({"manifest_version": MANIFEST_VERSION, **manifest})
        json.dump(payload, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path
