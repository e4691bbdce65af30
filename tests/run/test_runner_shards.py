"""One runner invocation over several benchmarks, and sharded runs merged by evaluation with an exactly-once check.

The runner is the real command line (``freelm.run.cli.main``) against a real
SGLang-protocol HTTP server over the counting model; evaluation is the real
``eval_passk.py`` command line, and the viewer reads a sharded run too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo_paths import REPO

from freelm.data import load_problem_sources
from freelm.evaluation import eval_cli
from freelm.manifest import manifest_path
from freelm.records import RolloutRecord, RolloutResult, read_rollouts
from freelm.run.cli import main as runner_main
from freelm.shards import Shard, read_run, run_files, run_stem, shard_of
from freelm.testing.counting import CountingEngine, counting_tokenizer
from freelm.testing.sglang_server import SGLangTestServer
from freelm.viewer import find_record

ROLLOUTS = 3
TARGET = 24


def write_benchmark(path: Path, ids: range) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"id": i, "prompt": f"Count to {TARGET} ({i}).", "answer": str(TARGET)}) + "\n" for i in ids)
    )
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(runner flags without --data/--output, the benchmark dir): ids repeat across benchmarks on purpose."""
    root = tmp_path_factory.mktemp("shards")
    tokenizer = counting_tokenizer(TARGET)
    tokenizer.hf.save_pretrained(root / "tokenizer")
    write_benchmark(root / "data" / "aime.jsonl", range(4))
    write_benchmark(root / "data" / "hmmt.jsonl", range(3))
    write_benchmark(root / "data" / "more" / "imo_a.jsonl", range(2))
    write_benchmark(root / "data" / "more" / "imo_b.jsonl", range(2))
    with SGLangTestServer(CountingEngine(tokenizer, target=TARGET)) as server:
        flags = [
            "--n-rollouts", str(ROLLOUTS), "--endpoint", server.url.removeprefix("http://"),
            "--tokenizer", str(root / "tokenizer"), "--clean-every", "16", "--context-limit", "300",
            "--max-tokens", "800", "--concurrency", "4", "--max-retries", "1", "--timeout", "30", "--no-progress",
        ]  # fmt: skip
        yield flags, root / "data"


def all_data(data: Path) -> list[str]:
    return [
        "--data",
        str(data / "aime.jsonl"),
        "--data",
        str(data / "more" / "imo_*.jsonl"),
        "--data",
        str(data / "hmmt.jsonl"),
    ]


def expected_keys(data: Path) -> list[tuple[str, str, int]]:
    sizes = {"aime": 4, "imo_a": 2, "imo_b": 2, "hmmt": 3}
    return sorted((s, str(i), r) for s, n in sizes.items() for i in range(n) for r in range(ROLLOUTS))


def keys(records) -> list[tuple[str, str, int]]:
    return sorted((r.source, r.id, r.rollout) for r in records)


def evaluate(tmp_path: Path, *inputs: str) -> int:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--input", *inputs, "--output", str(tmp_path / "metrics.json"), "--workers", "1", "--no-progress"]
    )
    return eval_cli.run(args)


def test_one_invocation_over_several_benchmarks_files_and_a_glob(setup, tmp_path, capsys):
    flags, data = setup
    out = tmp_path / "all.jsonl"
    assert runner_main([*all_data(data), "--limit", "2", "--output", str(out), *flags]) == 0  # first 2 of each
    assert len(read_rollouts(out)) == 8 * ROLLOUTS
    capsys.readouterr()
    assert runner_main([*all_data(data), "--output", str(out), *flags]) == 0  # resume: the rest, once
    assert "9 done, 0 failed, 24 already present, 0 remaining of 33" in capsys.readouterr().out
    records = read_rollouts(out)
    assert keys(records) == expected_keys(
        data
    )  # every (source, id, rollout) exactly once, ids repeating across sources
    assert all(r.finish_reason == "stop" for r in records)
    manifest = json.loads(manifest_path(out).read_text())
    assert (
        manifest["problems"] == 11
        and manifest["status"] == "complete"
        and manifest["shard"] == {"index": 0, "count": 1}
    )
    assert runner_main([*all_data(data), "--output", str(out), *flags]) == 0
    assert "0 done, 0 failed, 33 already present" in capsys.readouterr().out
    assert evaluate(tmp_path, f"all={out}") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["runs"][0]
    assert metrics["overall"]["problems"] == 11 and metrics["overall"]["rollouts"] == 33


def test_two_benchmarks_with_one_source_name_and_a_glob_without_match_are_refused(tmp_path):
    write_benchmark(tmp_path / "a" / "aime.jsonl", range(2))
    write_benchmark(tmp_path / "b" / "aime.jsonl", range(3))
    with pytest.raises(ValueError, match=r"b/aime.jsonl: problem '0' of source 'aime' is also in .*a/aime.jsonl"):
        load_problem_sources([tmp_path / "a" / "aime.jsonl", tmp_path / "b" / "aime.jsonl"])
    with pytest.raises(ValueError, match="no file matches"):
        load_problem_sources([str(tmp_path / "c" / "*.jsonl")])
    same = load_problem_sources([tmp_path / "a" / "aime.jsonl", str(tmp_path / "a" / "*.jsonl")])
    assert len(same) == 2  # the same file named twice counts once


def test_every_key_belongs_to_exactly_one_shard_and_shards_are_balanced():
    counts = [0, 0, 0]
    for problem in range(40):
        per_problem = [0, 0, 0]
        for rollout in range(8):
            owners = [s for s in range(3) if Shard(s, 3).owns("aime", str(problem), rollout)]
            assert owners == [shard_of("aime", str(problem), rollout, 3)]
            per_problem[owners[0]] += 1
        assert sorted(per_problem) == [2, 3, 3]  # a problem's rollouts go round-robin from a hashed start
        counts = [a + b for a, b in zip(counts, per_problem)]
    assert max(counts) - min(counts) <= 40 // 3
    assert Shard(1, 3).output(Path("runs/x.jsonl")) == Path("runs/x.shard-1-of-3.jsonl")
    for index in (3, -1):
        with pytest.raises(ValueError) as info:
            Shard(index, 3)
        assert str(info.value) == f"--shard-index must be in 0..2 for --num-shards 3, got {index}"


@pytest.fixture(scope="module")
def sharded(setup, tmp_path_factory):
    """A 3-shard run of all benchmarks: {index: path}."""
    flags, data = setup
    out = tmp_path_factory.mktemp("sharded") / "run.jsonl"
    for index in (2, 0, 1):
        assert (
            runner_main(
                [*all_data(data), "--output", str(out), "--num-shards", "3", "--shard-index", str(index), *flags]
            )
            == 0
        )
    assert not out.exists()
    return {i: out.with_name(f"run.shard-{i}-of-3.jsonl") for i in range(3)}


def test_three_shards_are_disjoint_and_merged_by_eval_passk_exactly_once(setup, sharded, tmp_path):
    _, data = setup
    parts = [keys(read_rollouts(path)) for path in sharded.values()]
    assert all(parts) and sum(map(len, parts)) == len(expected_keys(data))
    for index, path in sharded.items():
        manifest = json.loads(manifest_path(path).read_text())
        assert manifest["shard"] == {"index": index, "count": 3} and manifest["summary"]["total"] == len(parts[index])
    unsharded = sharded[0].with_name("run.jsonl")
    assert run_files(unsharded) == list(sharded.values())
    assert keys(read_run(run_files(unsharded))) == expected_keys(data)
    assert evaluate(tmp_path, f"sharded={unsharded}") == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())["runs"][0]
    assert metrics["overall"]["rollouts"] == 33 and metrics["duplicate_records"] == 0
    glob = str(sharded[0].with_name("run.shard-*-of-3.jsonl"))
    assert (
        evaluate(tmp_path, glob) == 0
        and json.loads((tmp_path / "metrics.json").read_text())["runs"][0]["name"] == "run"
    )
    record = find_record(unsharded, "1", 2, source="hmmt")  # the viewer reads the shards as one run
    assert (record.source, record.id, record.rollout) == ("hmmt", "1", 2)


def test_a_missing_shard_is_refused(sharded, tmp_path, capsys):
    two = ",".join(str(sharded[i]) for i in (0, 2))
    assert evaluate(tmp_path, f"x={two}") == 2
    assert "missing shard(s) [1] of 3 (expected " in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"missing shard\(s\) \[1\] of 3"):
        find_record(two, "1", 0, source="hmmt")


def test_one_shard_given_alone_is_refused_naming_the_others(sharded, tmp_path, capsys):
    """By its own name, by the run's name where it is the only shard, and renamed: never read as the whole run."""
    alone = tmp_path / "alone" / sharded[1].name
    alone.parent.mkdir()
    shutil.copy(sharded[1], alone)
    shutil.copy(manifest_path(sharded[1]), manifest_path(alone))
    renamed = tmp_path / "mine.jsonl"  # its manifest still says which shard it is
    shutil.copy(sharded[1], renamed)
    shutil.copy(manifest_path(sharded[1]), manifest_path(renamed))
    for given, expected in [
        (sharded[1], [sharded[0], sharded[2]]),
        (
            alone.with_name("run.jsonl"),
            [alone.with_name("run.shard-0-of-3.jsonl"), alone.with_name("run.shard-2-of-3.jsonl")],
        ),
        (renamed, [tmp_path / "mine.shard-0-of-3.jsonl", tmp_path / "mine.shard-2-of-3.jsonl"]),
    ]:
        assert evaluate(tmp_path, f"x={given}") == 2
        error = capsys.readouterr().err
        assert f"missing shard(s) [0, 2] of 3 (expected {expected[0]}, {expected[1]})" in error
        with pytest.raises(SystemExit, match=r"missing shard\(s\) \[0, 2\] of 3"):
            find_record(given, "1", 0, source="hmmt")
    assert not (tmp_path / "metrics.json").exists()


def _shard_by_name(folder: Path, index: int, count: int) -> Path:
    """A shard known by its file name alone (no manifest): a record for every key of 4 problems x 3 it owns."""
    shard = Shard(index, count)
    path = shard.output(folder / "run.jsonl")
    result = RolloutResult("done", "stop", 1, 1, 2, 2)
    lines = [
        RolloutRecord.from_result(
            result, id=str(i), source="aime", rollout=r, seed=0, answer="1", mode="vanilla", config_hash="h"
        ).to_dict()
        for i in range(4)
        for r in range(3)
        if shard.owns("aime", str(i), r)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize(("index", "count"), [(0, 2), (1, 2), (0, 3), (2, 3)])
def test_a_shard_named_as_one_is_never_read_as_a_whole_run(tmp_path, index, count):
    paths = [_shard_by_name(tmp_path, i, count) for i in range(count)]
    assert run_files(tmp_path / "run.jsonl") == paths
    assert keys(read_run(paths)) == sorted(("aime", str(i), r) for i in range(4) for r in range(3))
    others = [i for i in range(count) if i != index]
    for path in paths:
        if path != paths[index]:
            path.unlink()
    for given in ([paths[index]], run_files(tmp_path / "run.jsonl")):
        with pytest.raises(ValueError) as info:
            read_run(given)
        assert str(info.value) == (
            f"missing shard(s) {others} of {count} (expected {', '.join(str(paths[i]) for i in others)})"
        )


def test_a_duplicated_shard_is_refused(sharded, tmp_path, capsys):
    again = tmp_path / "rerun" / sharded[1].name  # the same shard run twice, in another folder
    again.parent.mkdir()
    shutil.copy(sharded[1], again)
    shutil.copy(manifest_path(sharded[1]), manifest_path(again))
    listing = ",".join(map(str, [sharded[0], sharded[1], again, sharded[2]]))
    assert evaluate(tmp_path, f"x={listing}") == 2
    assert f"shard 1 of 3 given twice: {sharded[1]} and {again}" in capsys.readouterr().err


def test_shards_of_another_config_or_count_are_refused(setup, sharded, tmp_path, capsys):
    flags, data = setup
    other = tmp_path / "run.jsonl"
    assert (
        runner_main(
            [*all_data(data), "--output", str(other), "--num-shards", "3", "--shard-index", "1", "--seed", "5", *flags]
        )
        == 0
    )
    mixed = ",".join(map(str, [sharded[0], other.with_name("run.shard-1-of-3.jsonl"), sharded[2]]))
    assert evaluate(tmp_path, f"x={mixed}") == 2
    assert "shards written with different settings (config hash" in capsys.readouterr().err
    foreign = tmp_path / "run.shard-0-of-2.jsonl"
    shutil.copy(sharded[0], foreign)
    assert evaluate(tmp_path, f"x={foreign},{sharded[1]},{sharded[2]}") == 2
    assert "shards of different runs (--num-shards [2, 3])" in capsys.readouterr().err


def test_the_slurm_array_script_runs_one_shard_per_task(setup, tmp_path):
    flags, data = setup
    out = tmp_path / "array.jsonl"
    base = {
        k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("NUM_SHARDS", "SHARD_INDEX")
    }
    base.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    script = [str(REPO / "scripts" / "slurm_array.sh")]
    for task in range(3):
        env = {**base, "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "0"}
        done = subprocess.run(["bash", *script, *all_data(data), "--output", str(out), *flags], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"shard {task} of 3" in done.stderr
    assert keys(read_run(run_files(out))) == expected_keys(data)
    rerun = {**base, "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "2"}
    refused = subprocess.run(
        ["bash", *script, "--dry-run", "--output", str(out)], env=rerun, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "set NUM_SHARDS" in refused.stderr  # a partial resubmission must keep N
    dry = subprocess.run(["bash", *script, "--dry-run", "--output", str(out)], env={**rerun, "NUM_SHARDS": "3"},
                         capture_output=True, text=True)  # fmt: skip
    assert dry.returncode == 0 and "--num-shards 3 --shard-index 2" in dry.stdout
    outside = subprocess.run(["bash", *script, "--output", str(out)], env=base, capture_output=True, text=True)
    assert outside.returncode == 2 and "not a Slurm array task" in outside.stderr


def test_which_shard_owns_a_key_is_pinned():
    """A sharded run resumed or evaluated by a later version must find each key in the shard that wrote it."""
    assert [shard_of("aime25", str(i), r, 5) for i in range(4) for r in (0, 1, 2)] == [
        1, 2, 3, 4, 0, 1, 1, 2, 3, 1, 2, 3,
    ]  # fmt: skip
    assert [shard_of("aime25", "1", r, 4) for r in range(4)] == [0, 1, 2, 3]  # round-robin from a hashed start
    assert run_stem("runs/x.shard-0-of-2.jsonl,runs/y.jsonl") == "x" == run_stem("runs/x.jsonl")


def test_each_refusal_names_the_files_and_the_record_it_is_about(tmp_path):
    shards = [_shard_by_name(tmp_path, i, 2) for i in range(2)]
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError) as info:
        read_run([shards[0], missing])
    assert str(info.value) == f"{missing}: runner output not found"

    plain = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path in plain:
        path.write_text("")
    with pytest.raises(ValueError) as info:
        read_run([*shards, *plain])
    assert str(info.value) == (
        f"{plain[0]}, {plain[1]}: not a shard (no shard in its manifest or name), given with other files"
    )

    (tmp_path / "other").mkdir()
    other = _shard_by_name(tmp_path / "other", 1, 3)
    with pytest.raises(ValueError) as info:
        read_run([shards[0], other])
    assert str(info.value) == f"shards of different runs (--num-shards [2, 3]): {shards[0]} (0 of 2), {other} (1 of 3)"

    # any record moved into another shard: named by its line in that file and the shard that owns it
    (tmp_path / "three").mkdir()
    thirds = [_shard_by_name(tmp_path / "three", i, 3) for i in range(3)]
    own = thirds[1].read_text()
    for owner in (0, 2):
        for line in thirds[owner].read_text().splitlines(keepends=True):
            thirds[1].write_text(own + line)
            record = json.loads(line)
            with pytest.raises(ValueError) as info:
                read_run(thirds)
            assert str(info.value) == (
                f"{thirds[1]}: record {len(own.splitlines()) + 1} (aime, {record['id']}, rollout {record['rollout']}) "
                f"belongs to shard {owner}, not 1"
            )


def test_a_run_name_stands_for_its_file_its_shards_or_its_pattern_matches(tmp_path):
    """A missing name without shards stays in the list (read_run then names it); a pattern must match something."""
    missing = tmp_path / "missing.jsonl"
    assert run_files(f"{missing},{missing}") == [missing, missing]
    with pytest.raises(ValueError) as info:
        run_files(tmp_path / "run.shard-*.jsonl")
    assert str(info.value) == f"{tmp_path / 'run.shard-*.jsonl'}: no file matches this pattern"
    shards = [_shard_by_name(tmp_path, i, 2) for i in range(2)]
    assert run_files(tmp_path / "run.jsonl") == shards == run_files(tmp_path / "run.shard-*.jsonl")


def test_shards_of_other_settings_are_refused_naming_each_hash_even_an_empty_shard(tmp_path):
    """An empty shard (every rollout failed) has no record to carry its hash: its manifest's is read."""
    shards = [_shard_by_name(tmp_path, i, 2) for i in range(2)]
    shards[1].write_text(shards[1].read_text().replace('"config_hash": "h"', '"config_hash": "h2"'))
    with pytest.raises(ValueError) as info:
        read_run(shards)
    assert str(info.value) == (
        f"shards written with different settings (config hash h in {shards[0]}, h2 in {shards[1]}): not one run"
    )
    shards[1].write_text("")
    manifest_path(shards[1]).write_text(json.dumps({"config_hash": "h2", "shard": {"index": 1, "count": 2}}))
    with pytest.raises(ValueError) as info:
        read_run(shards)
    assert str(info.value) == (
        f"shards written with different settings (config hash h in {shards[0]}, h2 in {shards[1]}): not one run"
    )
    manifest_path(shards[1]).write_text(json.dumps({"config_hash": "h", "shard": {"index": 1, "count": 2}}))
    assert len(read_run(shards)) == len(shards[0].read_text().splitlines())
