"""The batch runner on the counting model (no torch, no network): output, resume, config hash, errors, CLI checks."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from repo_paths import REPO

from freelm.backends.base import (
    BackendError,
    ContextWindow,
    GenerateRequest,
    GenerateResult,
    TransientBackendError,
)
from freelm.backends.pool import EndpointPool
from freelm.cleaners import get_cleaner
from freelm.data import Problem
from freelm.jsonl import iter_jsonl
from freelm.manifest import errors_path, manifest_path
from freelm.records import read_rollouts
from freelm.run.batch import run_batch
from freelm.run.cli import run
from freelm.run.components import Components
from freelm.run.flags import build_parser, normalize_endpoint, read_endpoints_file
from freelm.run.plan import ConfigMismatch
from freelm.run.settings import rollout_seed, settings_differences
from freelm.run.spec import RunSpec
from freelm.testing.counting import CountingBackend, counting_answer, counting_tokenizer
from freelm.tokenizer import Tokenizer

TARGET = 30


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return counting_tokenizer(TARGET)


def problems(n: int = 3) -> list[Problem]:
    return [
        Problem(id=str(i), source="count", prompt=f"Count to {TARGET}, puzzle {i}.", answer=str(TARGET))
        for i in range(n)
    ]


def parse(*flags: str) -> RunSpec:
    return RunSpec.from_argv(["--data", "unused.jsonl", "--output", "unused.jsonl", *flags])


BATCH_FLAGS = ("--clean-every", "20", "--context-limit", "400", "--max-tokens", "600")


def batch(tmp_path, tokenizer, *flags, n_rollouts=2, backend=None, probs=None, window=None):
    """run_batch over a pool of one counting backend (``window``: the served one); returns (summary, backend)."""
    spec = RunSpec.from_argv(
        ["--data", "unused.jsonl", "--output", str(tmp_path / "out.jsonl"), "--n-rollouts", str(n_rollouts),
         "--concurrency", "4", "--no-progress", *BATCH_FLAGS, *flags]
    )  # fmt: skip
    backend = backend or CountingBackend(tokenizer, target=TARGET)
    pool = EndpointPool([backend], remote=False, probe_interval=0.01)
    cleaner = None
    if spec.mode == "freelm":
        cleaner = get_cleaner(spec.cleaner).build(spec.cleaner_options, backend=pool, tokenizer=tokenizer)
    components = Components(reasoner=pool, tokenizer=tokenizer, cleaner=cleaner, pools=(pool,))

    async def go():
        try:
            return await run_batch(problems() if probs is None else probs, spec, components, window=window)
        finally:
            await pool.aclose()

    return asyncio.run(go()), backend


def keys(path: Path) -> list[tuple[str, str, int]]:
    return [(r.source, r.id, r.rollout) for r in read_rollouts(path)]


def test_batch_writes_one_record_per_rollout_with_identity_seed_and_hash(tmp_path, tokenizer):
    summary, _ = batch(tmp_path, tokenizer, "--seed", "7", n_rollouts=3)
    out = tmp_path / "out.jsonl"
    records = read_rollouts(out)
    assert sorted(keys(out)) == [("count", str(i), r) for i in range(3) for r in range(3)]
    settings = parse(*BATCH_FLAGS, "--seed", "7").settings
    for rec in records:
        assert rec.mode == "freelm" and rec.config_hash == settings.config_hash
        assert rec.seed == rollout_seed(7, "count", rec.id, rec.rollout)
        assert rec.finish_reason == "stop" and rec.response.endswith(counting_answer(TARGET))
        assert rec.answer == str(TARGET) and rec.prompt.startswith("Count to")
        assert rec.cleaning_rounds >= 1 and rec.peak_context_tokens <= 400
    assert len({r.seed for r in records}) == 9
    assert summary.done == 9 and summary.failed == 0 and summary.present_at_start == 0 and summary.remaining == 0
    assert summary.generated_tokens == sum(r.generated_tokens for r in records)
    assert summary.mean_cleaning_rounds == pytest.approx(sum(r.cleaning_rounds for r in records) / 9)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["status"] == "complete" and manifest["config_hash"] == settings.config_hash
    assert manifest["settings"]["loop"]["clean_every"] == 20 and manifest["settings"]["seed"] == 7
    assert manifest["summary"]["done"] == 9 and manifest["ended_at"] is not None
    assert manifest["versions"]["freelm"] and manifest["endpoints"][0]["retries"] == 0
    assert not errors_path(out).exists()


@dataclass
class Recording(CountingBackend):
    """The counting model, keeping every request: it counts whatever the prompt, so only this shows what was sent."""

    requests: list[GenerateRequest] = field(default_factory=list)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.requests.append(request)
        return await super().generate(request)


def test_each_rollout_is_sent_its_own_problem_and_seed_inside_the_served_window(tmp_path, tokenizer):
    backend = Recording(tokenizer, target=TARGET)
    served = ContextWindow(max_input=298, max_total=300, source="a server smaller than --context-limit 400")
    batch(tmp_path, tokenizer, "--seed", "7", "--temperature", "0.6", backend=backend, window=served)
    reasoning = [r for r in backend.requests if r.adapter is None]
    starts = [r for r in reasoning if tokenizer.decode(r.input_ids).endswith("<think>\n")]  # nothing generated yet
    firsts = [tokenizer.decode(r.input_ids) for r in starts]
    for i in range(3):  # two rollouts of each problem start from its prompt, none from another's
        assert sum(f"Count to {TARGET}, puzzle {i}." in text for text in firsts) == 2, firsts
    assert all(r.seed is not None for r in reasoning), [r.seed for r in backend.requests]
    assert len(starts) == 6 and len({r.seed for r in starts}) == 6

    def asked(r: GenerateRequest) -> int:  # prompt + the most it may generate
        return (len(r.input_ids) if r.input_ids is not None else len(tokenizer.encode(r.text))) + r.max_new_tokens

    assert max(asked(r) for r in reasoning) == 300  # up to the served window, never past it


def test_resume_skips_present_rollouts_and_extends(tmp_path, tokenizer):
    batch(tmp_path, tokenizer, n_rollouts=2)
    first = (tmp_path / "out.jsonl").read_bytes()
    summary, backend = batch(tmp_path, tokenizer, n_rollouts=3)
    out = tmp_path / "out.jsonl"
    assert out.read_bytes().startswith(first)  # append-only
    assert sorted(keys(out)) == [("count", str(i), r) for i in range(3) for r in range(3)]
    assert summary.present_at_start == 6 and summary.done == 3
    # nothing left: no request at all
    summary, backend = batch(tmp_path, tokenizer, n_rollouts=3)
    assert summary.done == 0 and backend.calls == 0
    manifest = json.loads(manifest_path(out).read_text())
    assert [run["summary"]["done"] for run in manifest["previous_runs"]] == [6, 3]


def test_torn_tail_is_dropped_and_the_rollout_redone(tmp_path, tokenizer):
    batch(tmp_path, tokenizer, n_rollouts=2)
    out = tmp_path / "out.jsonl"
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    summary, _ = batch(tmp_path, tokenizer, n_rollouts=2)
    assert summary.done == 1
    assert sorted(keys(out)) == [("count", str(i), r) for i in range(3) for r in range(2)]
    assert all(obj for _, obj in iter_jsonl(out, tolerate_torn_tail=False))


def test_last_line_missing_only_its_newline_is_kept_not_lost(tmp_path, tokenizer):
    batch(tmp_path, tokenizer, n_rollouts=2)
    out = tmp_path / "out.jsonl"
    out.write_bytes(out.read_bytes()[:-1])  # killed between the record's bytes and its newline
    summary, backend = batch(tmp_path, tokenizer, n_rollouts=2)
    assert summary.done == 0 and backend.calls == 0  # the record counted as present: it must stay
    assert sorted(keys(out)) == [("count", str(i), r) for i in range(3) for r in range(2)]
    assert out.read_bytes().endswith(b"\n")


def test_failed_rollouts_go_to_the_errors_file_and_are_retried_next_run(tmp_path, tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    backend.fail_next = deque([BackendError("HTTP 400: bad request"), BackendError("HTTP 400: bad request")])
    summary, _ = batch(tmp_path, tokenizer, n_rollouts=2, backend=backend)
    out = tmp_path / "out.jsonl"
    assert summary.failed == 2 and summary.done == 4 and len(keys(out)) == 4
    errors = [obj for _, obj in iter_jsonl(errors_path(out))]
    assert len(errors) == 2 and all("HTTP 400" in e["error"] for e in errors)
    settings = parse(*BATCH_FLAGS).settings
    missing = {("count", str(i), r) for i in range(3) for r in range(2)} - set(keys(out))
    assert {(e["source"], e["id"], e["rollout"]) for e in errors} == missing
    for e in errors:  # the line a user or a script reads to know what failed, with what, and when
        assert e["seed"] == rollout_seed(settings.seed, "count", e["id"], e["rollout"])
        assert e["config_hash"] == settings.config_hash and e["generated_tokens"] == 0 and e["rounds"] == 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d.*", e["time"]), e["time"]
    assert json.loads(manifest_path(out).read_text())["status"] == "incomplete"
    summary, _ = batch(tmp_path, tokenizer, n_rollouts=2)
    assert summary.done == 2 and summary.failed == 0
    assert sorted(keys(out)) == [("count", str(i), r) for i in range(3) for r in range(2)]


def test_a_torn_errors_file_is_repaired_before_the_next_failures_are_appended(tmp_path, tokenizer):
    out = tmp_path / "out.jsonl"
    errors_path(out).write_text('{"error": "first"}\n{"error": "killed mid-wri')
    backend = CountingBackend(tokenizer, target=TARGET)
    backend.fail_next = deque([BackendError("HTTP 400: bad request")])
    summary, _ = batch(tmp_path, tokenizer, n_rollouts=2, backend=backend)
    assert summary.failed == 1
    errors = [obj["error"] for _, obj in iter_jsonl(errors_path(out), tolerate_torn_tail=False)]
    assert errors[0] == "first" and len(errors) == 2 and "HTTP 400" in errors[1]


def test_transient_failures_are_retried_without_losing_the_rollout(tmp_path, tokenizer):
    backend = CountingBackend(tokenizer, target=TARGET)
    backend.fail_next = deque([TransientBackendError("connection reset")] * 3)
    summary, _ = batch(tmp_path, tokenizer, n_rollouts=2, backend=backend)
    assert summary.done == 6 and summary.failed == 0 and summary.retries == 3
    assert all(r.finish_reason == "stop" for r in read_rollouts(tmp_path / "out.jsonl"))


def test_different_config_is_refused_with_the_differences_then_forced(tmp_path, tokenizer):
    batch(tmp_path, tokenizer, n_rollouts=2)
    old_hash = read_rollouts(tmp_path / "out.jsonl")[0].config_hash
    with pytest.raises(ConfigMismatch) as info:
        batch(tmp_path, tokenizer, "--clean-every", "25", "--temperature", "0.7", n_rollouts=2)
    message = str(info.value)
    new_hash = parse(*BATCH_FLAGS, "--clean-every", "25", "--temperature", "0.7").settings.config_hash
    assert old_hash in message and new_hash in message
    assert "loop.clean_every: 20 -> 25" in message and "loop.sampling.temperature: 0.6 -> 0.7" in message
    assert "--force" in message
    summary, _ = batch(tmp_path, tokenizer, "--clean-every", "25", "--force", n_rollouts=2)
    assert summary.done == 6
    assert {r.config_hash for r in read_rollouts(tmp_path / "out.jsonl")} != {old_hash}
    moved = [p for p in tmp_path.iterdir() if ".replaced-" in p.name]
    assert len(moved) == 2  # the old output and its manifest, kept


def _failing(tokenizer, times: int, message: str) -> CountingBackend:
    backend = CountingBackend(tokenizer, target=TARGET)
    backend.fail_next = deque([BackendError(message)] * times)
    return backend


def _replaced(folder: Path) -> list[Path]:
    """The outputs --force moved aside in ``folder`` (their manifests and error files sit next to them)."""
    return [
        path
        for path in folder.iterdir()
        if ".replaced-" in path.name and not path.name.endswith((".manifest.json", ".errors.jsonl"))
    ]


def test_force_moves_the_old_errors_aside_with_the_output_the_new_file_holds_only_new_errors(tmp_path, tokenizer):
    out = tmp_path / "out.jsonl"
    batch(tmp_path, tokenizer, n_rollouts=2, backend=_failing(tokenizer, 2, "HTTP 400: old run"))
    old = {path: path.read_bytes() for path in (out, manifest_path(out), errors_path(out))}
    summary, _ = batch(
        tmp_path, tokenizer, "--clean-every", "25", "--force", n_rollouts=2,
        backend=_failing(tokenizer, 1, "HTTP 400: new run"),
    )  # fmt: skip
    assert summary.failed == 1 and summary.done == 5
    errors = [obj for _, obj in iter_jsonl(errors_path(out))]
    assert [e["error"] for e in errors] == ["reasoner: HTTP 400: new run"]
    assert {e["config_hash"] for e in errors} == {r.config_hash for r in read_rollouts(out)}
    # the old files sit together under one name, byte for byte
    [moved] = _replaced(tmp_path)
    assert {path: path.read_bytes() for path in (moved, manifest_path(moved), errors_path(moved))} == dict(
        zip((moved, manifest_path(moved), errors_path(moved)), old.values())
    )
    # the same command again retries exactly the new run's failure: the old failures are not its business
    summary, backend = batch(tmp_path, tokenizer, "--clean-every", "25", n_rollouts=2)
    assert summary.done == 1 and summary.present_at_start == 5


def test_force_moves_aside_an_old_run_whose_every_rollout_failed(tmp_path, tokenizer):
    """The old output holds no record, only its error file does: --force with other settings still starts afresh."""
    out = tmp_path / "out.jsonl"
    batch(tmp_path, tokenizer, n_rollouts=2, backend=_failing(tokenizer, 6, "HTTP 400: old run"))
    assert read_rollouts(out) == [] and len(list(iter_jsonl(errors_path(out)))) == 6
    with pytest.raises(ConfigMismatch, match="--force"):  # the error file is the old settings' as much as the output
        batch(tmp_path, tokenizer, "--clean-every", "25", n_rollouts=2)
    summary, _ = batch(tmp_path, tokenizer, "--clean-every", "25", "--force", n_rollouts=2)
    assert summary.done == 6 and summary.failed == 0 and not errors_path(out).exists()
    [moved] = _replaced(tmp_path)
    assert len(list(iter_jsonl(errors_path(moved)))) == 6


def test_a_second_force_in_the_same_second_keeps_the_first_replaced_run(tmp_path, tokenizer, monkeypatch):
    """Two --force runs within one second (a script that retries at once): nothing moved aside is overwritten."""
    monkeypatch.setattr(time, "strftime", lambda fmt, *args: "20261201-120000")  # one clock second for all
    out = tmp_path / "out.jsonl"
    contents = []
    for n, every in enumerate(("20", "25", "30")):
        backend = _failing(tokenizer, 1, f"HTTP 400: run {n}")
        batch(tmp_path, tokenizer, "--clean-every", every, "--force", n_rollouts=2, backend=backend)
        contents.append((out.read_bytes(), errors_path(out).read_bytes()))
    kept = [(path.read_bytes(), errors_path(path).read_bytes()) for path in _replaced(tmp_path)]
    assert sorted(kept) == sorted(contents[:2])


def test_execution_settings_do_not_change_the_hash_results_settings_do():
    base = parse().settings.config_hash
    assert (
        parse("--concurrency", "3", "--timeout", "5", "--endpoint", "h:1", "--max-retries", "0").settings.config_hash
        == base
    )
    for flags in (
        ["--seed", "1"],
        ["--mode", "vanilla"],
        ["--cleaner", "headtail"],
        ["--max-tokens", "10"],
        ["--top-k", "-1"],
        ["--adapter-name", "x"],
    ):
        assert parse(*flags).settings.config_hash != base, flags
    # vanilla ignores cleaning settings
    assert (
        parse("--mode", "vanilla", "--clean-every", "5").settings.config_hash
        == parse("--mode", "vanilla").settings.config_hash
    )


def test_vanilla_and_headtail_modes_are_labelled(tmp_path, tokenizer):
    (tmp_path / "v").mkdir()
    batch(tmp_path / "v", tokenizer, "--mode", "vanilla", "--context-limit", "2000", n_rollouts=1)
    records = read_rollouts(tmp_path / "v" / "out.jsonl")
    assert {r.mode for r in records} == {"vanilla"} and all(r.cleaning_rounds == 0 for r in records)
    (tmp_path / "h").mkdir()
    batch(tmp_path / "h", tokenizer, "--cleaner", "headtail", "--head-tokens", "4", "--tail-tokens", "8", n_rollouts=1)
    records = read_rollouts(tmp_path / "h" / "out.jsonl")
    assert {r.mode for r in records} == {"headtail"} and all(r.cleaning_rounds >= 1 for r in records)


def test_same_problem_id_in_two_sources_is_two_problems(tmp_path, tokenizer):
    probs = [Problem("1", "aime24", "Count.", "30"), Problem("1", "aime25", "Count.", "30")]
    batch(tmp_path, tokenizer, n_rollouts=1, probs=probs)
    assert sorted(keys(tmp_path / "out.jsonl")) == [("aime24", "1", 0), ("aime25", "1", 0)]


def test_rollout_seed_is_stable_and_distinct():
    assert rollout_seed(0, "s", "1", 0) == rollout_seed(0, "s", "1", 0)
    seeds = {rollout_seed(s, src, i, r) for s in (0, 1) for src in ("a", "b") for i in ("1", "2") for r in range(4)}
    assert len(seeds) == 32 and all(0 <= s < 2**31 - 1 for s in seeds)
    # pinned, as config hashes are: a rollout re-run after an upgrade must get its recorded seed
    assert [rollout_seed(0, "aime24", "7", r) for r in range(2)] == [423533282, 105328059]


def test_a_refused_resume_names_keys_that_appear_vanish_or_change_kind():
    """Switching mode or backend turns a settings block into null (or back); a key can be new or gone."""
    old = {"cleaner": {"adapter": "free"}, "loop": {"clean_every": 5}, "model": None}
    new = {"cleaner": None, "loop": {"clean_every": 5, "max_tokens": 9}, "model": {"model": "/m"}}
    assert settings_differences(old, new) == [
        'cleaner: {"adapter": "free"} -> null',
        "loop.max_tokens: null -> 9",
        'model: null -> {"model": "/m"}',
    ]
    assert settings_differences({"loop": {"clean_every": 5}}, {"loop": {}}) == ["loop.clean_every: 5 -> null"]


def test_endpoints_parsing(tmp_path):
    assert normalize_endpoint("10.0.0.5:30000") == "http://10.0.0.5:30000"
    assert normalize_endpoint("https://node3:8443/") == "https://node3:8443"
    for bad in ("node3", "ftp://x:1", "host:port", ":80"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            normalize_endpoint(bad)
    path = tmp_path / "endpoints.txt"
    path.write_text("# cluster A\nnode1:30000\n\nnode2:30000  # second\nnode3\n")
    with pytest.raises(ValueError, match=r"endpoints.txt:5: bad endpoint 'node3'"):
        read_endpoints_file(path)
    path.write_text("# cluster A\nnode1:30000\n\nnode2:30000  # second\n")
    assert read_endpoints_file(path) == ["http://node1:30000", "http://node2:30000"]


def test_the_spec_takes_every_endpoint_and_the_cleaners_backend_follows_the_reasoners(tmp_path):
    path = tmp_path / "endpoints.txt"
    path.write_text("node1:30000\n")
    spec = parse("--endpoint", "h:1", "--endpoints-file", str(path), "--endpoint", "node1:30000",
                 "--cleaner-endpoint", "c:2", "--cleaner-endpoint", "c:2")  # fmt: skip
    assert spec.endpoints == ("http://h:1", "http://node1:30000")  # the flags and the file, each server once
    assert spec.cleaner_endpoints == ("http://c:2",)
    with pytest.raises(ValueError, match="^--cleaner-endpoint: bad endpoint .nohost."):  # the flag holding it
        parse("--cleaner-endpoint", "nohost")
    # a remote reasoner's kind cleans too; an in-process one cleans on SGLang unless told
    assert parse("--backend", "openai", "--served-model", "m").cleaner_backend == "openai"
    assert parse("--backend", "local", "--model", str(tmp_path)).cleaner_backend == "sglang"
    assert parse("--backend", "local", "--cleaner-backend", "openai").cleaner_backend == "openai"


def test_the_spec_keeps_the_split_the_retry_wait_and_the_progress_choice():
    spec = parse("--split", "test", "--down-wait", "7", "--no-progress")
    assert (spec.split, spec.down_wait, spec.progress) == ("test", 7.0, False)
    assert parse().progress is None  # a bar only on a terminal


def test_the_manifest_records_the_shards_own_output_and_paths_as_text(tmp_path, tokenizer):
    flags = ("--num-shards", "2", "--shard-index", "1", "--tokenizer", str(tmp_path))
    batch(tmp_path, tokenizer, *flags, n_rollouts=1)
    output = tmp_path / "out.shard-1-of-2.jsonl"
    config = json.loads(manifest_path(output).read_text())["config"]
    assert config["output"] == str(output)
    assert config["tokenizer"] == str(tmp_path)


# --------------------------------------------------------------------------- CLI: bad input, nothing written

BAD_INPUTS = {
    "not_json": ('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n', r"bad\.jsonl:2: not valid JSON"),
    "missing_prompt": ('{"id": 1, "prompt": "a"}\n{"id": 2}\n', r"bad\.jsonl:2: missing field\(s\) prompt"),
    "missing_id": ('{"prompt": "a"}\n', r"bad\.jsonl:1: missing field\(s\) id"),
    "duplicate_id": (
        '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n',
        r"bad\.jsonl:2: duplicate id '1'.*first at .*bad\.jsonl:1",
    ),
    "empty": ("\n", r"bad\.jsonl: no problems in file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_malformed_dataset_is_a_clear_error_and_no_output(tmp_path, capsys, case):
    text, pattern = BAD_INPUTS[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(text)
    out = tmp_path / "out.jsonl"
    args = parse_cli(
        "--data", str(data), "--output", str(out), "--endpoint", "127.0.0.1:9", "--tokenizer", str(tmp_path)
    )
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(pattern, err), err
    assert list(tmp_path.iterdir()) == [data]


def test_missing_data_file_and_bad_flags_are_clear_errors(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    common = ["--output", str(out), "--tokenizer", str(tmp_path)]
    cases = [
        (["--data", str(tmp_path / "nope.jsonl"), "--endpoint", "h:1"], "nope.jsonl: problem file not found"),
        (["--data", "x.jsonl"], "needs --endpoint HOST:PORT"),
        (["--data", "x.jsonl", "--endpoint", "localhost"], "bad endpoint 'localhost'"),
        (["--data", "x.jsonl", "--backend", "local"], "--backend local needs --model DIR"),
        (["--data", "x.jsonl", "--endpoint", "h:1", "--n-rollouts", "0"], "--n-rollouts must be >= 1"),
        (["--data", "x.jsonl", "--endpoint", "h:1", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--data", "x.jsonl", "--endpoint", "h:1", "--min-p", "1.5"], "--min-p must be in [0, 1], got 1.5"),
        (["--data", "x.jsonl", "--endpoint", "h:1", "--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
        (
            ["--data", "x.jsonl", "--endpoint", "h:1", "--clean-template", str(tmp_path / "t.txt")],
            "cannot read cleaning template",
        ),
        (["--data", "x.jsonl", "--endpoint", "h:1", "--backend", "openai"], "needs --served-model"),
        (
            ["--data", "x.jsonl", "--endpoint", "h:1", "--resume", "evict-gaps"],
            "--resume evict-gaps needs an engine that evicts KV in place (--backend local); --backend sglang",
        ),
    ]
    for flags, message in cases:
        assert run(parse_cli(*common, *flags)) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert list(tmp_path.iterdir()) == []


def test_unloadable_tokenizer_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": 1, "prompt": "a"}\n')
    args = parse_cli(
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o.jsonl"),
        "--endpoint",
        "127.0.0.1:9",
        "--tokenizer",
        str(tmp_path / "none"),
    )
    # a missing directory must never be tried as a Hub name
    assert run(args) == 2
    assert "--tokenizer" in capsys.readouterr().err and not (tmp_path / "o.jsonl").exists()


def parse_cli(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(list(flags))


def test_help_documents_every_flag():
    result = subprocess.run(
        [sys.executable, str(REPO / "runner.py"), "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0
    for flag in ("--data", "--split", "--output", "--n-rollouts", "--seed", "--limit", "--force", "--backend", "--endpoint",
                 "--endpoints-file", "--cleaner-endpoint", "--cleaner-backend", "--model", "--adapter", "--tokenizer",
                 "--mode", "--cleaner", "--adapter-name", "--clean-template", "--clean-max-tokens", "--clean-every",
                 "--max-tokens", "--context-limit", "--max-clean-rounds", "--temperature", "--top-p", "--top-k", "--min-p",
                 "--concurrency", "--timeout", "--max-retries", "--problem-suffix", "exit codes"):  # fmt: skip
        assert flag in result.stdout, flag
    assert "(default: 0.6)" in result.stdout and "(default: 8)" in result.stdout


def test_components_close_every_pool_even_when_one_fails():
    import asyncio

    from freelm.run.components import Components

    closed = []

    class Pool:
        def __init__(self, name: str, fails: bool):
            self.name, self.fails = name, fails

        async def aclose(self) -> None:
            closed.append(self.name)
            if self.fails:
                raise OSError(f"{self.name}: close failed")

    pools = (Pool("reasoner", True), Pool("cleaner", False))
    components = Components(reasoner=pools[0], tokenizer=None, cleaner=None, pools=pools)
    with pytest.raises(OSError, match="reasoner: close failed"):
        asyncio.run(components.aclose())
    assert closed == ["reasoner", "cleaner"]
