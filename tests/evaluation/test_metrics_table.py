"""metrics.json and the paper-format table from a fixture run, checked against hand counts."""

import argparse
import json

import pytest
from repo_paths import EVAL_FIXTURES

from freelm.evaluation import eval_cli


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--input",
            f"Free()LM={EVAL_FIXTURES / 'freelm.jsonl'}",
            "--baseline",
            f"Vanilla={EVAL_FIXTURES / 'vanilla.jsonl'}",
            "--output",
            str(out / "metrics.json"),
            "--markdown",
            str(out / "table.md"),
            "--plots-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert eval_cli.run(args) == 0
    return out


def test_metrics_json(evaluated):
    data = json.loads((evaluated / "metrics.json").read_text())
    assert data["baseline"] == "Vanilla" and data["token_metric"] == "generated"
    vanilla, free = data["runs"]
    aime = vanilla["benchmarks"]["aime25"]
    # problem 1: 70, 070 right; 72 wrong; no </think>. problem 2: 588 x2 right; 586 wrong; no box.
    assert aime["avg_at_n"] == 0.5 and aime["pass_at_k"]["2"] == pytest.approx(5 / 6)
    assert aime["maj_at_k"]["2"] == pytest.approx(4 / 6) and aime["pass_at_k"]["4"] == 1.0
    assert aime["unanswered"] == 2 and aime["unanswered_reasons"] == {"no_think_close": 1, "no_box": 1}
    assert aime["finish_reasons"] == {"stop": 7, "length": 1}
    brumo = vanilla["benchmarks"]["brumo25"]  # 1.5 and \dfrac{3}{2} right, \frac{2}{3} twice wrong
    assert brumo["avg_at_n"] == 0.5 and brumo["grade_methods"]["math_verify"] >= 1
    assert vanilla["overall"]["problems"] == 3 and vanilla["overall"]["rollouts"] == 12
    assert vanilla["average"]["avg_at_n"] == pytest.approx(0.5)
    fb = free["benchmarks"]
    assert fb["aime25"]["avg_at_n"] == pytest.approx((3 / 4 + 2 / 4) / 2) and fb["brumo25"]["avg_at_n"] == 1.0
    assert free["overall"]["mean_cleaning_rounds"] == 3.0
    # SE across rollout indices: per-index accuracies of the vanilla run are 1, 1, 0, 0
    assert vanilla["overall"]["avg_at_n_se"] == pytest.approx((1 / 3) ** 0.5 / 2)


def test_paper_table(evaluated):
    table = (evaluated / "table.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| Run | aime25 p@1 | aime25 #Token | brumo25 p@1 | brumo25 #Token | Avg p@1 | Avg #Token |"
    assert lines[2] == "| Vanilla | 50.0 | 9.9k | 50.0 | 10.2k | 50.0 | 10.1k |"
    # Average p@1 (62.5 + 100) / 2 = 81.2 (+31.2 points); tokens 8.07k vs 10.07k = -19.9 %
    assert lines[3] == "| Free()LM | 62.5 | 7.9k | 100.0 | 8.2k | 81.2 (+31.2) | 8.1k (-19.9%) |"
    assert "n=4 rollouts" in table


def test_plots_written(evaluated):
    for name in ("accuracy_vs_tokens.png", "peak_context.png"):
        data = (evaluated / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
