"""Selecting the long-horizon subset from a vanilla run (fixture runs: mean tokens 9850 / 9950 / 10250 per problem)."""

from pathlib import Path

from repo_paths import EVAL_FIXTURES

from freelm.data import load_problems
from freelm.evaluation.long_horizon import main
from freelm.records import read_rollouts


def select(tmp_path: Path, *flags: str) -> tuple[int, list, list]:
    out = tmp_path / "subset"
    code = main(
        [
            "--vanilla",
            str(EVAL_FIXTURES / "vanilla.jsonl"),
            "--data",
            str(EVAL_FIXTURES / "problems.jsonl"),
            "--out-dir",
            str(out),
        ]
        + list(flags)
    )
    problems = load_problems(out / "problems.jsonl") if code == 0 else []
    return code, [p.key for p in problems], read_rollouts(out / "vanilla.jsonl")


def test_mean_and_any_rules_write_the_subset_and_its_vanilla_rollouts(tmp_path):
    code, keys, vanilla = select(tmp_path, "--threshold", "9900")
    assert code == 0 and keys == [("aime25", "2"), ("brumo25", "5")]
    assert sorted({(r.source, r.id) for r in vanilla}) == keys and len(vanilla) == 8
    code, keys, _ = select(tmp_path, "--threshold", "10900", "--rule", "any")
    assert code == 0 and keys == [("brumo25", "5")]


def test_nothing_reaching_the_threshold_exits_1(tmp_path):
    code, keys, vanilla = select(tmp_path, "--threshold", "20000")
    assert code == 1 and keys == [] and vanilla == []
