"""The LLM judge against a scripted OpenAI-compatible server on 127.0.0.1."""

import argparse
import json
import re

import pytest
from repo_paths import EVAL_FIXTURES

from freelm.evaluation import eval_cli, judge_cli
from freelm.evaluation.judge import load_judge_template, parse_verdict, render_judge_prompt
from freelm.evaluation.judgments import read_judgments
from freelm.testing.openai_chat_server import ChatFault, OpenAIChatTestServer

SECRET = "sk-test-DO-NOT-LEAK-4f2b9"


def test_parse_verdict():
    assert parse_verdict("They match.\n\\boxed{Correct}") is True
    assert parse_verdict("\\boxed{correct} ... on reflection \\boxed{Incorrect}") is False
    assert parse_verdict("\\boxed{\\text{Correct}}.") is True
    assert parse_verdict("I think they are equal.") is None
    assert parse_verdict("\\boxed{Maybe}") is None
    assert parse_verdict(None) is None


def test_template_rendering_keeps_latex_literal(tmp_path):
    template = load_judge_template()
    prompt = render_judge_prompt(template, "Find $x$ with {answer} in it", "\\frac{3}{2}", "\\{1,2\\}")
    assert "Find $x$ with {answer} in it" in prompt and "\\frac{3}{2}" in prompt and "\\{1,2\\}" in prompt
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholders here")
    with pytest.raises(ValueError, match="lacks placeholder"):
        load_judge_template(bad)


CANDIDATE = re.compile(r"Candidate's final answer:\n(.*?)\n\nExplain", re.S)
# Scripted judge: a verdict per extracted answer of the fixture runs; "1.5" gets a reply without a verdict.
VERDICTS = {
    "70": "Same integer. \\boxed{Correct}",
    "070": "Leading zero only. \\boxed{Correct}",
    "72": "Different. \\boxed{Incorrect}",
    "71": "Different. \\boxed{Incorrect}",
    "588": "\\boxed{Correct}",
    "586": "\\boxed{Incorrect}",
    "\\dfrac{3}{2}": "\\boxed{Correct}",
    "\\frac{3}{2}": "\\boxed{Correct}",
    "\\frac{2}{3}": "Reciprocal. \\boxed{Incorrect}",
    "1.5": "They look similar, I suppose.",
}

EXPECTED = {
    a: "unparseable" if a == "1.5" else "correct" if "\\boxed{Correct}" in v else "incorrect"
    for a, v in VERDICTS.items()
}


def responder(body):
    answer = CANDIDATE.search(body["messages"][0]["content"]).group(1)
    return VERDICTS[answer]


def judge_args(server, output, *extra):
    parser = argparse.ArgumentParser()
    judge_cli.add_arguments(parser)
    return parser.parse_args(
        [
            "--input",
            str(EVAL_FIXTURES / "vanilla.jsonl"),
            str(EVAL_FIXTURES / "freelm.jsonl"),
            "--data",
            str(EVAL_FIXTURES / "problems.jsonl"),
            "--base-url",
            server.base_url,
            "--model",
            "judge",
            "--api-key-env",
            "FREELM_TEST_JUDGE_KEY",
            "--output",
            str(output),
            "--concurrency",
            "3",
            "--no-progress",
            *extra,
        ]
    )


def test_judge_end_to_end_with_faults_resume_and_no_key_leak(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FREELM_TEST_JUDGE_KEY", SECRET)
    output = tmp_path / "judge.jsonl"
    with OpenAIChatTestServer(responder, model="judge") as server:
        # transient faults the openai client retries, and one malformed 200 body the judge asks again after
        server.script(ChatFault(429), ChatFault(500), ChatFault(503), ChatFault(status=200, body="{not json"))
        assert judge_cli.run(judge_args(server, output)) == 0
        first = read_judgments(output)
        assert server.statuses[429] == 1 and server.statuses[500] == 1 and server.malformed == 1
        assert {j.answer: j.verdict for j in first.values()} == EXPECTED
        assert len(server.bodies) == 3 + sum(j.attempts for j in first.values())  # + the 3 the client retried
        assert sum(j.attempts for j in first.values()) in (12, 13)  # one per answer, "1.5" twice more, +1 unless
        # the malformed body was one of "1.5"'s three attempts

        # a complete cache costs zero requests
        before = len(server.bodies)
        assert judge_cli.run(judge_args(server, output)) == 0
        assert len(server.bodies) == before

    # eval with the verdicts: the judge marks "1.5" (rule: correct) unparseable -> incorrect under "judge"
    metrics = {}
    for mode in ("rule", "judge", "either", "both", "fallback"):
        parser = argparse.ArgumentParser()
        eval_cli.add_arguments(parser)
        out = tmp_path / f"metrics-{mode}.json"
        args = parser.parse_args(
            [
                "--input",
                str(EVAL_FIXTURES / "vanilla.jsonl"),
                "--judgments",
                str(output),
                "--combine",
                mode,
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        assert eval_cli.run(args) == 0
        metrics[mode] = json.loads(out.read_text())["runs"][0]["benchmarks"]["brumo25"]
    assert metrics["rule"]["avg_at_n"] == 0.5 and metrics["rule"]["judge_overrides"] == 0
    assert metrics["judge"]["avg_at_n"] == 0.25 and metrics["judge"]["judge_overrides"] == 1
    assert metrics["either"]["avg_at_n"] == 0.5 and metrics["both"]["avg_at_n"] == 0.25
    assert metrics["fallback"]["avg_at_n"] == 0.5  # the rule decided every answer here

    # the key never reaches any output or log
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path


def test_missing_verdicts_are_an_error(tmp_path, capsys):
    (tmp_path / "judge.jsonl").write_text("")
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--input", str(EVAL_FIXTURES / "vanilla.jsonl"), "--judgments", str(tmp_path / "judge.jsonl"), "--no-progress"]
    )
    assert eval_cli.run(args) == 2
    assert "needs a judge verdict" in capsys.readouterr().err


def test_bad_judgment_line_names_file_and_line(tmp_path):
    path = tmp_path / "judge.jsonl"
    path.write_text(
        '{"source": "a", "id": "1", "ground_truth": "1", "answer": "1", "verdict": "perhaps", '
        '"model": "m", "attempts": 1}\n'
    )
    with pytest.raises(ValueError, match=r"judge.jsonl:1: unknown verdict"):
        read_judgments(path)


def test_torn_last_line_of_a_killed_judge_is_redone_not_glued_to(tmp_path, monkeypatch):
    monkeypatch.setenv("FREELM_TEST_JUDGE_KEY", SECRET)
    output = tmp_path / "judge.jsonl"
    with OpenAIChatTestServer(responder, model="judge") as server:
        assert judge_cli.run(judge_args(server, output)) == 0
        data = output.read_bytes()
        output.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1 + 20])  # killed while writing the last line
        before = len(server.bodies)
        assert judge_cli.run(judge_args(server, output)) == 0
        assert 1 <= len(server.bodies) - before <= 3  # only the torn verdict is asked again
        assert {j.answer: j.verdict for j in read_judgments(output).values()} == EXPECTED
