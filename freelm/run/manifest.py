"""What a run's ``OUT.manifest.json`` holds, typed: :class:`RunStart` and :class:`RunManifest`.

Two moments write it: :func:`~freelm.run.plan.record_start`, before anything
slow (a model load, the health checks), writes a :class:`RunStart`, so a run
killed while loading still shows under the next one's ``previous_runs``; then
:func:`~freelm.run.batch.run_batch` writes the whole :class:`RunManifest` and
rewrites it as the run goes (status, summary, endpoint counters). The keys on
disk are the field names, as they were when the manifest was an untyped dict,
so manifests written before resume and read alike (:func:`freelm.manifest.read_manifest`
reads them back as JSON: a manifest on disk may come from any earlier version).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freelm.manifest import write_manifest


@dataclass
class RunStart:
    """The manifest of a run that has started but not yet begun its batch (``status`` ``starting``)."""

    output: str
    command: list[str]
    settings: dict[str, Any]  # RunSettings.to_dict(): what decides results
    config_hash: str
    mode: str
    started_at: str
    run_id: str
    previous_runs: list[
        dict[str, Any]
    ]  # earlier invocations on this output: started/ended at, status, summary, command
    ended_at: str | None = None
    status: str = "starting"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self) -> Path:
        """Atomic rewrite of ``OUT.manifest.json`` (redacted, versioned: :func:`freelm.manifest.write_manifest`)."""
        return write_manifest(self.output, self.to_dict())


@dataclass
class RunManifest(RunStart):
    """The manifest of a running or finished batch: the start's fields and everything the batch knows."""

    config: dict[str, Any] = field(default_factory=dict)  # every flag as given (Paths as text)
    versions: dict[str, str | None] = field(default_factory=dict)  # python, platform, tracked packages
    problems: int = 0
    n_rollouts: int = 0
    shard: dict[str, Any] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)  # what the servers said about themselves
    seeds_honoured: bool | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # RunSummary.to_dict()
    endpoints: list[dict[str, Any]] = field(default_factory=list)  # each pool's counters
    #: the cleaning-outcome rule on everything the output holds (freelm.run.cleaning.CleaningRule.report); None: vanilla
    cleaning: dict[str, Any] | None = None
    status: str = "running"  # running, then complete, incomplete or interrupted
