"""OUT.manifest.json is a typed RunStart / RunManifest whose keys on disk are those the untyped dict had."""

from __future__ import annotations

import json

from freelm.manifest import manifest_path, read_manifest
from freelm.run.cli import main
from freelm.run.manifest import RunManifest, RunStart
from freelm.run.plan import history, record_start
from freelm.run.spec import RunSpec

#: The keys manifests were written with before they were typed (outputs written then must resume).
START_KEYS = {
    "manifest_version", "output", "command", "settings", "config_hash", "mode", "started_at", "ended_at", "status",
    "run_id", "previous_runs",
}  # fmt: skip
RUN_KEYS = START_KEYS | {
    "config", "versions", "problems", "n_rollouts", "shard", "served", "seeds_honoured", "summary", "endpoints",
    "cleaning",
}  # fmt: skip


def test_the_start_record_keeps_its_keys_and_a_killed_start_counts_as_a_previous_run(tmp_path):
    out = tmp_path / "out.jsonl"
    settings = RunSpec.from_argv(["--data", "d.jsonl", "--output", str(out)]).settings
    record_start(out, settings, "first")
    first = read_manifest(out)
    assert set(first) == START_KEYS and first["status"] == "starting" and first["ended_at"] is None
    record_start(out, settings, "second")  # the first start died while loading: it stays on record
    assert [run["status"] for run in read_manifest(out)["previous_runs"]] == ["starting"]
    assert len(history(out, settings, "second")) == 1  # this run's own start is not an earlier run of it
    assert len(history(out, settings, None)) == 2  # for another run, both are


def test_a_finished_run_writes_every_key_the_untyped_manifest_had(counting_kind, tmp_path):
    data, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": "Count to 30.", "answer": "30"}) + "\n" for i in range(2)))
    flags = ["--data", str(data), "--output", str(out), "--n-rollouts", "1", "--no-progress", "--backend", "counting"]
    budgets = ["--model", str(tmp_path / "m"), "--mode", "vanilla", "--context-limit", "400", "--max-tokens", "600"]
    assert main([*flags, *budgets]) == 0
    manifest = json.loads(manifest_path(out).read_text())
    assert set(manifest) == RUN_KEYS
    assert manifest["status"] == "complete" and manifest["summary"]["done"] == 2 and manifest["problems"] == 2
    assert [run["status"] for run in manifest["previous_runs"]] == []  # the start record was this run's own
    assert main([*flags, *budgets]) == 0  # resumed: nothing left to do, the earlier run on record
    again = json.loads(manifest_path(out).read_text())
    assert [run["status"] for run in again["previous_runs"]] == ["complete"] and again["summary"]["done"] == 0


def test_the_record_types_are_their_fields():
    start = RunStart("o", ["runner.py"], {}, "h", "vanilla", "t0", "id", [])
    assert start.to_dict()["status"] == "starting"
    full = RunManifest("o", ["runner.py"], {}, "h", "vanilla", "t0", "id", [], problems=3)
    assert full.status == "running" and set(full.to_dict()) == RUN_KEYS - {"manifest_version"}
