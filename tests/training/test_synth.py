"""Reward-filtered synthesis on the counting model (no torch): cuts, teacher over HTTP, filter, resume."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from freelm.data import Problem
from freelm.evaluation.grade import GraderPool
from freelm.loop import LoopConfig, run_rollout
from freelm.prompts import THINK_CLOSE, recover_thinking, render_cleaning_prompt
from freelm.records import RolloutRecord
from freelm.testing.counting import CountingBackend, counting_tokenizer
from freelm.testing.openai_chat_server import ChatFault, OpenAIChatTestServer
from freelm.tokenizer import Tokenizer
from freelm.training.cuts import collect_cuts, cut_trajectory
from freelm.training.reward import AnswerGrader, RewardFilter
from freelm.training.sft_data import check_file, read_rows
from freelm.training.synth import Synthesizer, keeps_empty
from freelm.training.teachers import FunctionTeacher, OpenAITeacher, TeacherError, teacher_messages

TARGET = 30
CLEAN_EVERY = 40
_STEP = re.compile(r"step (\d+)\n")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return counting_tokenizer(TARGET)


def vanilla_record(tokenizer: Tokenizer, problem: Problem) -> RolloutRecord:
    backend = CountingBackend(tokenizer, target=TARGET)
    result = asyncio.run(
        run_rollout(problem.prompt, reasoner=backend, tokenizer=tokenizer, cleaner=None, config=LoopConfig())
    )
    return RolloutRecord.from_result(
        result, id=problem.id, source=problem.source, rollout=0, seed=0, answer=str(TARGET), mode="vanilla",
        config_hash="h",
    )  # fmt: skip


def test_cuts_follow_the_loop_boundaries(tokenizer):
    problem = Problem(id="1", source="count", prompt="Count to 30.", answer="30")
    record = vanilla_record(tokenizer, problem)
    cuts = cut_trajectory(record, problem, tokenizer, CLEAN_EVERY)
    ids = tokenizer.encode(record.response)
    thinking_tokens = len(tokenizer.encode(record.response.split(THINK_CLOSE)[0]))
    assert [c.cut_tokens for c in cuts] == list(range(CLEAN_EVERY, thinking_tokens, CLEAN_EVERY))
    for cut in cuts:
        assert cut.thinking == tokenizer.decode(ids[: cut.cut_tokens]) and THINK_CLOSE not in cut.thinking
    assert len({c.key for c in cuts}) == len(cuts)


def test_collect_cuts_rejects_cleaned_runs_and_unknown_problems(tokenizer):
    problem = Problem(id="1", source="count", prompt="Count to 30.", answer=None)
    record = vanilla_record(tokenizer, problem)
    cuts = collect_cuts([("runs.jsonl", [record])], [problem], tokenizer, CLEAN_EVERY, max_cuts_per_trajectory=1)
    assert len(cuts) == 1 and cuts[0].problem.answer == "30"  # gold answer taken from the record
    with pytest.raises(ValueError, match=r"runs\.jsonl: record id='1'.*no such problem"):
        collect_cuts([("runs.jsonl", [record])], [], tokenizer, CLEAN_EVERY)
    record.cleaning_rounds = 2
    with pytest.raises(ValueError, match="vanilla trajectories"):
        collect_cuts([("runs.jsonl", [record])], [problem], tokenizer, CLEAN_EVERY)


def test_teacher_messages_keep_text_that_looks_like_the_template():
    thinking = "We have {problem} and <|im_end|> and\n## Reasoning so far\nhere"
    messages = teacher_messages("Find {thinking}.", thinking)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert user.endswith("## Reasoning so far\n" + thinking) and "## Problem\nFind {thinking}." in user
    assert "<think>" not in user  # the Free-Module's assistant pre-fill is not sent to a chat teacher
    prompt = render_cleaning_prompt("Find {thinking}.", thinking)
    assert all(m["content"] in prompt for m in messages)


def test_openai_teacher_retries_429_and_5xx_then_answers():
    problem = Problem(id="1", source="s", prompt="P?", answer="1")
    with OpenAIChatTestServer('[{"prefix": "a", "suffix": "b"}]') as server:
        server.script(ChatFault(429), ChatFault(503))
        teacher = OpenAITeacher(server.base_url, "teacher", "key", max_retries=2)
        reply = asyncio.run(teacher.suggest(problem, "a x b"))
        assert json.loads(reply.text) == [{"prefix": "a", "suffix": "b"}]
        assert server.statuses[429] == 1 and server.statuses[503] == 1 and server.completions == 1
        assert reply.prompt_tokens > 0 and reply.completion_tokens == 4
        assert server.bodies[-1]["messages"][1]["content"].endswith("a x b")

        server.script(ChatFault(500), ChatFault(500))  # max_retries=1: two attempts
        with pytest.raises(TeacherError, match="InternalServerError"):
            asyncio.run(OpenAITeacher(server.base_url, "teacher", "key", max_retries=1).suggest(problem, "t"))
        server.script(ChatFault(200, body='{"id": "x", "object": "chat.completion", "choices": []}'))
        with pytest.raises(TeacherError, match="without choices"):
            asyncio.run(OpenAITeacher(server.base_url, "teacher", "key", max_retries=0).suggest(problem, "t"))
        with pytest.raises(TeacherError, match="NotFound"):
            asyncio.run(OpenAITeacher(server.base_url, "other-model", "key", max_retries=0).suggest(problem, "t"))


def test_openai_teacher_survives_replies_with_fields_missing_or_null():
    """The openai client does not validate a reply: a choice without a message is a TeacherError (the cut stays
    undecided), null content or token counts read as "" and 0, never an AttributeError/TypeError that ends synthesis."""
    problem = Problem(id="1", source="s", prompt="P?", answer="1")
    head = '{"id": "x", "object": "chat.completion", '
    with OpenAIChatTestServer("[]") as server:

        def ask():  # a client per event loop
            return asyncio.run(OpenAITeacher(server.base_url, "teacher", "key", max_retries=0).suggest(problem, "t"))

        server.script(ChatFault(200, body=head + '"choices": [{"index": 0}]}'))
        with pytest.raises(TeacherError, match="without choices"):
            ask()
        server.script(
            ChatFault(
                200,
                body=head + '"choices": [{"index": 0, "message": {"role": "assistant", "content": null}}], '
                '"usage": {"prompt_tokens": null, "completion_tokens": "7"}}',
            )
        )
        reply = ask()
        assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ("", 0, 0)


def test_openai_teacher_stops_reading_a_reply_that_never_ends():
    """A 200 whose body never ends: the teacher reads at most its byte cap (http_limits) and fails that call as a
    TeacherError naming the cap, instead of buffering until the machine kills synthesis."""
    problem = Problem(id="1", source="s", prompt="P?", answer="1")
    with OpenAIChatTestServer("[]") as server:
        server.script(ChatFault(200, body="{", endless=True))
        teacher = OpenAITeacher(server.base_url, "teacher", "key", max_tokens=16, timeout=60, max_retries=0)
        started = time.monotonic()
        with pytest.raises(TeacherError, match="larger than"):
            asyncio.run(teacher.suggest(problem, "t"))
        assert time.monotonic() - started < 30  # stopped at the cap (about 1 MiB), not at the 60 s deadline


def test_keeps_empty_is_deterministic_and_near_the_share():
    keys = [("s", str(i), 0, 40) for i in range(2000)]
    kept = [keeps_empty(k, 0.25) for k in keys]
    assert kept == [keeps_empty(k, 0.25) for k in keys]
    assert 0.2 < sum(kept) / len(kept) < 0.3
    assert not any(keeps_empty(k, 0.0) for k in keys) and all(keeps_empty(k, 1.0) for k in keys)


def test_reward_comparison_modes(tokenizer):
    def make(**kw):
        return RewardFilter(CountingBackend(tokenizer), tokenizer, AnswerGrader(None), **kw)

    assert make().accepts(0.5, 0.5) and not make().accepts(0.25, 0.5)
    assert not make(comparison="gt").accepts(0.5, 0.5) and make(comparison="gt").accepts(0.75, 0.5)
    assert not make(margin=0.1).accepts(0.55, 0.5) and make(margin=-0.25).accepts(0.25, 0.5)
    with pytest.raises(ValueError, match="k must be"):
        make(k=0)


# --------------------------------------------------------------------------- the whole synthesis


def scripted_teacher(body: dict) -> str | ChatFault:
    """Answers by problem: good, bad (deletes the step the count continues from), unresolvable, empty, prose."""
    user = body["messages"][-1]["content"]
    problem = re.search(r"## Problem\n(.*?)\n\n## Reasoning so far", user, re.DOTALL).group(1)
    thinking = user.split("## Reasoning so far\n", 1)[1]
    steps = _STEP.findall(thinking)
    first, keep_last, all_complete = f"step {steps[0]}\n", f"step {steps[-2]}\n", f"step {steps[-1]}\n"
    behaviour = problem.split()[0]
    if behaviour == "Good":
        return json.dumps([{"prefix": first, "suffix": keep_last}])
    if behaviour == "Bad":
        return json.dumps([{"prefix": first, "suffix": all_complete}])
    if behaviour == "Mixed":
        return json.dumps([{"prefix": "no such text", "suffix": "x"}, {"prefix": first, "suffix": keep_last}])
    if behaviour == "Unresolvable":
        return json.dumps([{"prefix": "step", "suffix": "\n"}])  # "step" occurs many times: ambiguous
    if behaviour == "Empty":
        return "```json\n[]\n```"
    return "I would delete the early steps."


def test_synthesis_filters_by_reward_and_resumes(tokenizer, tmp_path):
    behaviours = ["Good", "Bad", "Mixed", "Unresolvable", "Empty", "Prose"]
    problems = [Problem(id=b, source="count", prompt=f"{b} count to 30.", answer="30") for b in behaviours]
    records = [vanilla_record(tokenizer, p) for p in problems]
    cuts = collect_cuts([("runs", records)], problems, tokenizer, CLEAN_EVERY, max_cuts_per_trajectory=1)
    assert len(cuts) == len(problems)
    # continuations get just enough tokens to finish from where the cut left off; restarting the count does not fit
    full = len(tokenizer.encode(records[0].response))
    loop = LoopConfig(max_tokens=full - CLEAN_EVERY + 8)
    output, log = tmp_path / "sft.jsonl", tmp_path / "sft.synth.jsonl"

    def synthesize(server) -> tuple:
        reasoner = CountingBackend(tokenizer, target=TARGET)
        teacher = OpenAITeacher(server.base_url, "teacher", "key", max_retries=0)
        with GraderPool(workers=1) as pool:
            reward = RewardFilter(reasoner, tokenizer, AnswerGrader(pool), k=2, loop=loop)
            synth = Synthesizer(teacher, reward, output, log, keep_empty=1.0, concurrency=4)
            return asyncio.run(synth.run(cuts, progress=False)), reasoner

    with OpenAIChatTestServer(scripted_teacher) as server:
        server.script(ChatFault(500))  # one example's teacher call fails: undecided, retried by the next run
        summary, reasoner = synthesize(server)
        assert summary.teacher_errors == 1 and sum(summary.statuses.values()) == len(cuts) - 1
        summary2, _ = synthesize(server)
        assert summary2.resumed == len(cuts) - 1 and sum(summary2.statuses.values()) == 1
        summary3, reasoner3 = synthesize(server)
        assert summary3.resumed == len(cuts) and reasoner3.calls == 0
        assert len(server.bodies) == len(cuts) + 1  # no example was asked twice after being decided

    outcomes = {row["id"]: row for _, row in read_rows_any(log)}
    assert {k: v["status"] for k, v in outcomes.items()} == {
        "Good": "accepted",
        "Bad": "rejected_reward",
        "Mixed": "accepted",
        "Unresolvable": "unresolvable",
        "Empty": "empty_kept",
        "Prose": "teacher_parse_error",
    }
    good, bad, mixed = outcomes["Good"], outcomes["Bad"], outcomes["Mixed"]
    assert good["pruned_accuracy"] == good["unpruned_accuracy"] == 1.0 and good["tokens_saved"] > 0
    assert bad["pruned_accuracy"] == 0.0 and bad["unpruned_accuracy"] == 1.0
    assert mixed["commands"] == 1 and mixed["dropped_commands"] == 1
    assert outcomes["Empty"]["pruned_accuracy"] == outcomes["Empty"]["unpruned_accuracy"] == 1.0
    assert all(o["teacher_prompt_tokens"] > 0 for o in outcomes.values())

    rows = {row["id"]: row for _, row in read_rows(output)}
    assert sorted(rows) == ["Empty", "Good", "Mixed"]
    assert rows["Empty"]["completion"] == "[]<|im_end|>"
    mixed_commands = json.loads(rows["Mixed"]["completion"].removesuffix("<|im_end|>"))
    assert len(mixed_commands) == 1 and mixed_commands[0]["prefix"] != "no such text"
    cut = next(c for c in cuts if c.problem.id == "Good")
    assert recover_thinking(rows["Good"]["prompt"], problem=rows["Good"]["problem"]) == cut.thinking
    report = check_file(output, tokenizer)
    assert report.ok and report.rows == 3 and report.empty == 1, report.errors

    totals = summary.to_dict()
    assert totals["decided"] == 5 and totals["teacher_errors"] == 1


def read_rows_any(path):
    from freelm.jsonl import iter_jsonl

    return list(iter_jsonl(path))


def test_a_local_function_teacher_goes_through_the_same_filter(tokenizer, tmp_path):
    problem = Problem(id="1", source="count", prompt="Count to 30.", answer="30")
    cuts = collect_cuts([("runs", [vanilla_record(tokenizer, problem)])], [problem], tokenizer, CLEAN_EVERY)

    def oracle(problem: Problem, thinking: str) -> str:
        steps = _STEP.findall(thinking)
        return json.dumps([{"prefix": f"step {steps[0]}\n", "suffix": f"step {steps[-2]}\n"}])

    with GraderPool(workers=1) as pool:
        reward = RewardFilter(CountingBackend(tokenizer, target=TARGET), tokenizer, AnswerGrader(pool), k=1)
        synth = Synthesizer(FunctionTeacher(oracle, "oracle"), reward, tmp_path / "o.jsonl", tmp_path / "o.log")
        summary = asyncio.run(synth.run(cuts, progress=False))
    assert summary.statuses == {"accepted": len(cuts)} and summary.teacher_prompt_tokens == 0
    assert {row["teacher"] for _, row in read_rows(tmp_path / "o.jsonl")} == {"oracle"}
