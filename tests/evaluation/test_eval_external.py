"""eval_passk.py on other tools' outputs: minimal rows, NeMo-Skills and lm-evaluation-harness shapes.

Each shape is derived from the same runner records (tests/fixtures/eval/vanilla.jsonl), so each must
give the same pass@k / maj@k as the records themselves; what a shape does not carry (token columns)
must come out as absent (None, "n/a"), not as zero.
NeMo-Skills writes ``output-rs<seed>.jsonl`` rows holding the input fields plus ``generation``,
``num_generated_tokens`` and ``expected_answer`` (one file per seed); lm-evaluation-harness
``--log_samples`` writes ``doc_id``, ``doc``, ``target``, ``resps`` (a list per request) and ``filtered_resps``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pytest
from repo_paths import EVAL_FIXTURES

from freelm.evaluation import eval_cli
from freelm.evaluation.external import external_records

FIXTURE = EVAL_FIXTURES / "vanilla.jsonl"
RECORDS = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
METRICS = ("avg_at_n", "pass_at_k", "maj_at_k", "unanswered", "problems", "rollouts")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(tmp_path: Path, name: str, path: Path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    out = tmp_path / f"{name}.json"
    argv = ["--input", f"{name}={path}", "--output", str(out), "--markdown", str(tmp_path / f"{name}.md")]
    args = parser.parse_args([*argv, "--no-progress", "--workers", "1", *extra])
    assert eval_cli.run(args) == 0
    return json.loads(out.read_text())["runs"][0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return evaluate(tmp_path_factory.mktemp("ref"), "runner", FIXTURE)


def same_grades(run: dict, reference: dict, benchmarks) -> None:
    for bench in benchmarks:
        for key in METRICS:
            assert run["benchmarks"][bench][key] == reference["benchmarks"][bench][key], (bench, key)


def test_minimal_rows_grade_like_the_runner_records(tmp_path, reference):
    rows = [{k: r[k] for k in ("id", "source", "rollout", "prompt", "response", "answer") if k in r} for r in RECORDS]
    run = evaluate(tmp_path, "minimal", write_jsonl(tmp_path / "minimal.jsonl", rows))
    same_grades(run, reference, ("aime25", "brumo25"))
    overall = run["overall"]
    assert overall["mean_generated_tokens"] is None and overall["mean_peak_context_tokens"] is None  # absent
    assert run["average"]["mean_generated_tokens"] is None
    assert "n/a" in (tmp_path / "minimal.md").read_text()


def test_answers_joined_from_data_and_response_aliases(tmp_path, reference):
    aliases = ("generation", "output", "completion", "model_output")
    rows = [
        {"id": r["id"], "source": r["source"], aliases[i % len(aliases)]: r["response"]} for i, r in enumerate(RECORDS)
    ]  # no rollout: the position among a problem's rows; no answer: from --data
    problems = {(r["source"], r["id"]): r["answer"] for r in RECORDS}
    data = write_jsonl(
        tmp_path / "problems.jsonl",
        [{"id": i, "source": s, "prompt": f"problem {i}", "answer": a} for (s, i), a in problems.items()],
    )
    run = evaluate(tmp_path, "aliases", write_jsonl(tmp_path / "aliases.jsonl", rows), "--data", str(data))
    same_grades(run, reference, ("aime25", "brumo25"))


def test_nemo_skills_shape(tmp_path, reference):
    aime = [r for r in RECORDS if r["source"] == "aime25"]
    rows = [
        {
            "id": r["id"],
            "problem": f"problem {r['id']}",
            "expected_answer": r["answer"],
            "generation": r["response"],
            "num_generated_tokens": r["generated_tokens"],
        }
        for r in sorted(aime, key=lambda r: r["rollout"])  # output-rs0.jsonl, output-rs1.jsonl, ... concatenated
    ]
    run = evaluate(tmp_path, "nemo", write_jsonl(tmp_path / "output-rs.jsonl", rows), "--source", "aime25")
    same_grades(run, reference, ("aime25",))
    bench = run["benchmarks"]["aime25"]
    assert bench["mean_generated_tokens"] == reference["benchmarks"]["aime25"]["mean_generated_tokens"]
    assert bench["mean_peak_context_tokens"] is None


def test_lm_evaluation_harness_shape(tmp_path, reference):
    by_doc = defaultdict(list)
    for r in sorted(RECORDS, key=lambda r: r["rollout"]):
        if r["source"] == "aime25":
            by_doc[r["id"]].append(r)
    rows = [
        {
            "doc_id": doc_id,
            "doc": {"problem": f"problem {doc_id}", "answer": rs[0]["answer"]},
            "target": rs[0]["answer"],
            "arguments": {"gen_args_0": {"arg_0": f"problem {doc_id}", "arg_1": {"until": []}}},
            "resps": [[r["response"]] for r in rs],
            "filtered_resps": [r["response"] for r in rs],
        }
        for doc_id, rs in by_doc.items()
    ]
    run = evaluate(tmp_path, "lm_eval", write_jsonl(tmp_path / "samples_aime25.jsonl", rows), "--source", "aime25")
    same_grades(run, reference, ("aime25",))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"source": "s", "response": "x"}, r"rows.jsonl:1: no problem id"),
        ({"id": 1, "response": "x"}, r"rows.jsonl:1: no 'source' field: name the benchmark with --source"),
        ({"id": 1, "source": "s"}, r"rows.jsonl:1: no response field"),
        ({"id": 1, "source": "s", "response": "x", "num_generated_tokens": "12"}, r"must be an integer"),
    ],
)
def test_bad_rows_name_file_line_and_field(row, message):
    with pytest.raises(ValueError, match=message):
        external_records([(1, row)], "rows.jsonl")
