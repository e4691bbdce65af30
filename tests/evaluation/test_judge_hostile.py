"""The LLM judge against hostile replies and a second judge on the same cache (a scripted server on 127.0.0.1).

Before: an HTML 200, a reply without ``message`` or with ``message: null``
crashed the judge (AttributeError, no verdict written); a reply dripping one
byte at a time outlived any ``--request-timeout`` (the client's timeout is per
read); a lone surrogate in a reply ended in exit 2 with a codec message; two
judges on one cache each judged, and paid for, every answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from repo_paths import EVAL_FIXTURES, REPO

from freelm.evaluation import judge_cli
from freelm.evaluation.judgments import lock_path, read_judgments
from freelm.testing.openai_chat_server import ChatFault, OpenAIChatTestServer, chat_completion

CANDIDATE = re.compile(r"Candidate's final answer:\n(.*?)\n\nExplain", re.S)
HOSTILE_ANSWER = "72"  # one of the fixture runs' answers: the one the server misbehaves on


def answer_of(body) -> str:
    return CANDIDATE.search(body["messages"][0]["content"]).group(1)


def verdict_for(answer: str) -> str:
    return (
        "\\boxed{Correct}"
        if answer in ("70", "070", "588", "\\frac{3}{2}", "\\dfrac{3}{2}", "1.5")
        else ("\\boxed{Incorrect}")
    )


def judge_args(server, output, *extra) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    judge_cli.add_arguments(parser)
    return parser.parse_args([
        "--input", str(EVAL_FIXTURES / "vanilla.jsonl"), str(EVAL_FIXTURES / "freelm.jsonl"),
        "--data", str(EVAL_FIXTURES / "problems.jsonl"), "--base-url", server.base_url, "--model", "judge",
        "--api-key-env", "FREELM_TEST_JUDGE_KEY", "--output", str(output), "--concurrency", "3", "--no-progress",
        *extra,
    ])  # fmt: skip


def without_message(**choice) -> str:
    completion = chat_completion("\\boxed{Correct}", model="judge")
    completion["choices"][0].pop("message")
    completion["choices"][0].update(choice)
    return json.dumps(completion)


MALFORMED = {
    "html_200": ChatFault(200, "<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"),
    "no_message": ChatFault(200, without_message()),
    "null_message": ChatFault(200, without_message(message=None)),
    "not_json": ChatFault(200, "{not json"),
    "invalid_utf8": ChatFault(200, json.dumps(chat_completion("\\boxed{Correct}", model="judge"))[:-2] + "\ud800}]}"),
    "content_not_text": ChatFault(200, json.dumps(chat_completion("x", model="judge")).replace('"x"', "[1, 2]")),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_reply_is_asked_again_then_an_error_and_every_other_verdict_kept(name, tmp_path, capsys):
    output = tmp_path / "judge.jsonl"
    fault = MALFORMED[name]

    def responder(body):
        answer = answer_of(body)
        return fault if answer == HOSTILE_ANSWER else verdict_for(answer)

    with OpenAIChatTestServer(responder, model="judge") as server:
        assert judge_cli.run(judge_args(server, output)) == 1
        judgments = read_judgments(output)
        assert len(judgments) == 10
        hostile = [j for j in judgments.values() if j.answer == HOSTILE_ANSWER]
        assert len(hostile) == 1 and hostile[0].verdict == "error" and hostile[0].attempts == 3  # asked 3 times
        assert hostile[0].error.startswith("malformed reply")
        assert all(j.verdict in ("correct", "incorrect") for j in judgments.values() if j.answer != HOSTILE_ANSWER)
        err = capsys.readouterr().err
        assert "Traceback" not in err and "re-run the same command to ask only those again" in err

        # the server heals: the next run asks that one answer, once
        server.responder = lambda body: verdict_for(answer_of(body))
        before = len(server.bodies)
        assert judge_cli.run(judge_args(server, output)) == 0
        assert len(server.bodies) == before + 1
        assert read_judgments(output)[hostile[0].key].verdict == "incorrect"


def test_a_malformed_reply_then_a_good_one_gets_the_verdict(tmp_path):
    output = tmp_path / "judge.jsonl"
    with OpenAIChatTestServer(lambda body: verdict_for(answer_of(body)), model="judge") as server:
        server.script(MALFORMED["null_message"], MALFORMED["html_200"])
        assert judge_cli.run(judge_args(server, output)) == 0
        assert server.malformed == 2
        assert all(j.verdict in ("correct", "incorrect") for j in read_judgments(output).values())


def test_a_reply_dripping_a_byte_at_a_time_ends_at_the_total_deadline(tmp_path, capsys):
    output = tmp_path / "judge.jsonl"
    drip = ChatFault(200, json.dumps(chat_completion("\\boxed{Correct}", model="judge")), drip_s=0.1)  # ~30 s

    def responder(body):
        answer = answer_of(body)
        return drip if answer == HOSTILE_ANSWER else verdict_for(answer)

    with OpenAIChatTestServer(responder, model="judge") as server:
        started = time.monotonic()
        assert judge_cli.run(judge_args(server, output, "--request-timeout", "2", "--max-retries", "0")) == 1
        elapsed = time.monotonic() - started
    hostile = [j for j in read_judgments(output).values() if j.answer == HOSTILE_ANSWER]
    assert hostile[0].verdict == "error" and "no complete reply within 2 s" in hostile[0].error
    assert elapsed < 20  # one 2 s deadline (plus grading-free start-up), not the 30 s drip
    assert "Traceback" not in capsys.readouterr().err


def test_a_reply_that_never_ends_is_cut_at_its_byte_cap(tmp_path, capsys):
    """A 200 whose body never ends: read up to the call's cap (http_limits.reply_limit of --max-tokens), then that
    answer is an error and every other verdict is kept; memory stays bounded, and it is not the deadline that ends it."""
    output = tmp_path / "judge.jsonl"
    endless = ChatFault(200, json.dumps(chat_completion("\\boxed{Correct}", model="judge"))[:-1], endless=True)

    def responder(body):
        answer = answer_of(body)
        return endless if answer == HOSTILE_ANSWER else verdict_for(answer)

    with OpenAIChatTestServer(responder, model="judge") as server:
        started = time.monotonic()
        assert judge_cli.run(judge_args(server, output, "--request-timeout", "120", "--max-retries", "0")) == 1
        elapsed = time.monotonic() - started
    judgments = read_judgments(output).values()
    hostile = [j for j in judgments if j.answer == HOSTILE_ANSWER]
    assert hostile[0].verdict == "error" and "larger than" in hostile[0].error
    assert all(j.verdict in ("correct", "incorrect") for j in judgments if j.answer != HOSTILE_ANSWER)
    assert elapsed < 60  # the cap, not the 120 s deadline
    assert "Traceback" not in capsys.readouterr().err


def test_a_lone_surrogate_in_a_reply_is_stored_as_valid_utf8(tmp_path, capsys):
    output = tmp_path / "judge.jsonl"
    with OpenAIChatTestServer(lambda body: "\ud800 " + verdict_for(answer_of(body)), model="judge") as server:
        assert judge_cli.run(judge_args(server, output)) == 0  # the JSON body carries the \ud800 escape
    text = output.read_bytes().decode("utf-8")  # strict: no invalid UTF-8 on disk
    judgments = read_judgments(output)
    assert len(judgments) == 10 and all(j.raw.startswith("\ufffd ") for j in judgments.values())
    assert "\\ud800" not in text and "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------------------- two judges, one cache

N_ANSWERS = 24


def many_answers_run(path: Path) -> Path:
    """One problem, N distinct answers (other tools' rows: the prompt is in the row)."""
    rows = [
        {"id": "1", "source": "s", "rollout": i, "answer": "7", "prompt": "What is 3+4?",
         "response": f"</think> The answer is \\boxed{{{i}}}."}
        for i in range(N_ANSWERS)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judge_process(server, run: Path, output: Path) -> subprocess.Popen:
    command = [
        sys.executable, str(REPO / "llm_judge.py"), "--input", str(run), "--base-url", server.base_url,
        "--model", "judge", "--api-key-env", "FREELM_TEST_JUDGE_KEY", "--output", str(output),
        "--concurrency", "4", "--no-progress",
    ]  # fmt: skip
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=REPO)


def slow_verdict(body) -> str:
    time.sleep(0.3)
    return "\\boxed{Correct}" if answer_of(body) == "7" else "\\boxed{Incorrect}"


def test_two_judges_on_one_cache_judge_every_answer_once(tmp_path):
    run, output = many_answers_run(tmp_path / "run.jsonl"), tmp_path / "judge.jsonl"
    with OpenAIChatTestServer(slow_verdict, model="judge") as server:
        judges = [judge_process(server, run, output) for _ in range(2)]
        results = [(p.wait(120), p.stderr.read()) for p in judges]
    assert [code for code, _ in results] == [0, 0], results
    assert sorted(answer_of(b) for b in server.bodies) == sorted(str(i) for i in range(N_ANSWERS))  # each once
    lines = output.read_text().splitlines()
    assert len(lines) == N_ANSWERS and len(read_judgments(output)) == N_ANSWERS  # no line twice
    assert all(f"{N_ANSWERS} distinct answers judged" in err for _, err in results)  # both report every verdict


def test_a_judge_killed_mid_run_leaves_a_cache_the_other_finishes(tmp_path):
    run, output = many_answers_run(tmp_path / "run.jsonl"), tmp_path / "judge.jsonl"
    with OpenAIChatTestServer(slow_verdict, model="judge") as server:
        first = judge_process(server, run, output)
        deadline = time.monotonic() + 60
        while (not output.exists() or output.read_text().count("\n") < 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)  # with answers in flight: its claims die with it
        first.wait()
        in_flight = len(server.bodies) - output.read_text().count("\n")
        with output.open("ab") as f:
            f.write(b'{"source": "s", "id": "1", "ground_tru')  # what a judge killed mid-line leaves
        second = judge_process(server, run, output)
        code, err = second.wait(120), second.stderr.read()
    assert code == 0, err
    judgments = read_judgments(output)
    assert len(judgments) == N_ANSWERS and all(j.verdict in ("correct", "incorrect") for j in judgments.values())
    assert len(output.read_text().splitlines()) == N_ANSWERS  # the torn line cut off, nothing twice
    assert len(server.bodies) <= N_ANSWERS + in_flight  # at most the killed judge's unanswered calls again
    assert lock_path(output).exists() and os.path.realpath(lock_path(output)).startswith(str(tmp_path.resolve()))


def test_an_answer_holding_a_lone_surrogate_is_judged_stored_and_found_again(tmp_path, capsys):
    """A run file's ``\\ud800`` escape decodes to a lone surrogate, which UTF-8 cannot hold: before, writing its
    verdict raised UnicodeEncodeError (exit 2 with a codec message)."""
    rows = [json.loads(line) for line in (EVAL_FIXTURES / "vanilla.jsonl").read_text().splitlines()]
    rows[0]["response"] = rows[0]["response"].rsplit("\\boxed", 1)[0] + "\\boxed{7\ud800}"
    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps(row) + "\n" for row in rows))  # json.dumps escapes it: a valid file
    output = tmp_path / "judge.jsonl"
    parser = argparse.ArgumentParser()
    judge_cli.add_arguments(parser)
    with OpenAIChatTestServer("\\boxed{Correct}", model="judge") as server:
        args = parser.parse_args([
            "--input", str(run), "--data", str(EVAL_FIXTURES / "problems.jsonl"), "--base-url", server.base_url,
            "--model", "judge", "--output", str(output), "--no-progress",
        ])  # fmt: skip
        assert judge_cli.run(args) == 0
        asked = len(server.bodies)
        assert any("7\ufffd" in b["messages"][0]["content"] for b in server.bodies)  # sent as U+FFFD
        assert judge_cli.run(args) == 0 and len(server.bodies) == asked  # found again: nothing asked twice
    output.read_bytes().decode("utf-8")  # strict
    assert "7\ud800" in {j.answer for j in read_judgments(output).values()}
    assert "Traceback" not in capsys.readouterr().err
