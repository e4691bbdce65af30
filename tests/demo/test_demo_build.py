"""The embedded default's build script and demo command, shortened: every step runs for real on a few examples."""

from __future__ import annotations

import json

import pytest

from freelm.cli import main as freelm_main
from freelm.data import load_problems
from freelm.demo.build import main as build_main
from freelm.demo.corpus import CLEAN_TEMPLATE
from freelm.records import read_rollouts
from freelm.training.adapter_check import check_sglang_adapter


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("embedded")
    assert build_main(["--out", str(out), "--quick", "--threads", "1"]) == 0
    return out


def test_build_writes_every_artifact(built):
    record = json.loads((built / "build.json").read_text())
    assert set(record["seconds"]) == {"pretrain", "synthesize", "train_lora", "benchmark"}
    assert record["synthesize"]["decided"] > 0
    assert check_sglang_adapter(built / "free") == []
    assert not (built / "lora-run").exists()
    assert len(load_problems(str(built / "benchmark.jsonl"))) == 4
    assert freelm_main(["data", "check", str(built / "sft.jsonl"), "--tokenizer", str(built / "base"),
                        "--template", str(CLEAN_TEMPLATE)]) == 0  # fmt: skip


def test_build_resumes_without_redoing_steps(built, capsys):
    assert build_main(["--out", str(built), "--quick", "--threads", "1"]) == 0
    assert capsys.readouterr().out.count("already built, skipped") == 4


def test_demo_runs_runner_eval_and_viewer(built, tmp_path, capsys):
    out = tmp_path / "demo"
    code = freelm_main(["demo", "--assets", str(built), "--out", str(out), "--problems", "2", "--large-problems", "0"])
    printed = capsys.readouterr().out
    # the quick build's Free-Module (a few training steps) answers no deletion list: its run is flagged (exit 3),
    # and the demo still prints every table, then says so and exits 3
    assert code == 3 and printed.rstrip().endswith("flagged (its cleaner gave almost no usable deletion list, see "
                                                   "above): Free()LM at context limit 216")  # fmt: skip
    assert "context limit 216" in printed and "Free()LM" in printed
    vanilla = read_rollouts(out / "vanilla_ctx216.jsonl")
    freelm = read_rollouts(out / "freelm_ctx216.jsonl")
    assert len(vanilla) == len(freelm) == 2
    assert all(r.cleaning_rounds == 0 for r in vanilla) and any(r.cleaning_rounds > 0 for r in freelm)
    assert (out / "trace.html").read_text().startswith("<!DOCTYPE html>")
    assert (out / "plots_ctx216" / "peak_context.png").stat().st_size > 0


def test_demo_adds_the_resume_strategies_rows_measured_once(built, tmp_path, capsys):
    """``--resume-strategies``: vanilla and the three strategies, each measured on its own engine; the default tables
    are printed as before, and a second call prints the rows again without running anything."""
    out = tmp_path / "demo"
    argv = ["demo", "--assets", str(built), "--out", str(out), "--problems", "1", "--large-problems", "0"]
    assert freelm_main([*argv, "--resume-strategies"]) == 3  # the quick build's Free()LM run is flagged, as above
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| 216 | ")]
    labels = [row.split(" | ")[1] for row in rows]
    for run in ("vanilla", "Free()LM, reprefill", "Free()LM, evict-gaps", "Free()LM, evict-rerotate"):
        assert run in labels
    strategies = out / "strategies"
    for name in ("reprefill", "evict-rerotate"):
        rounds = [r for record in read_rollouts(strategies / f"{name}_ctx216.jsonl") for r in record.rounds]
        measured = json.loads((strategies / f"{name}_ctx216.jsonl.engine.json").read_text())
        assert measured["evicted_tokens"] == sum(r.evicted_tokens for r in rounds)
        assert measured["reprefilled_tokens"] == sum(r.reprefilled_tokens for r in rounds)
        assert measured["peak_held_kv"] >= measured["peak_live_kv"] > 0 and measured["wall_s"] > 0
    assert freelm_main([*argv, "--resume-strategies"]) == 3
    again = capsys.readouterr().out
    assert "(measured)" not in again and [line for line in again.splitlines() if line.startswith("| 216 | Free()LM, ")]
