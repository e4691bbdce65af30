"""The validation layer: every malformed record field is ``file:line: field: expected X, got Y``, in every reader."""

from __future__ import annotations

import argparse
import copy
import json

import pytest

from freelm.evaluation import eval_cli
from freelm.records import CleanRecord, RolloutRecord, RoundRecord, read_rollouts
from freelm.validation import FieldError, build, describe, expect


def good_record() -> dict:
    clean = CleanRecord("free", 50, 40, deleted_spans=[(0, 5)], skipped=[{"prefix": "a", "suffix": "b", "reason": "x"}])
    rnd = RoundRecord(0, "step 1\n", 3, 10, 13, 0, None, "length", 0.1, clean=clean)
    record = RolloutRecord(
        id="1", source="s", rollout=0, seed=7, answer="30", mode="freelm", config_hash="h", response="</think>\\boxed{30}",
        finish_reason="stop", prompt_tokens=10, generated_tokens=3, final_context_tokens=13, peak_context_tokens=13,
        cleaning_rounds=1, wall_time_s=0.5, reasoning_time_s=0.1, cleaning_time_s=0.0, rounds=[rnd],
    )  # fmt: skip
    return json.loads(json.dumps(record.to_dict()))


def with_change(path: tuple, value) -> dict:
    record = good_record()
    target = record
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return record


BAD = [
    (("rollout",), "zero", "rollout: expected integer, got string 'zero'"),
    (("response",), ["a"], "response: expected string, got list ['a']"),
    (("rounds",), "x", "rounds: expected list, got string 'x'"),
    (("rounds", 0, "surprise"), 1, "rounds[0].surprise: unknown field"),
    (("rounds", 0, "clean", "applied"), "2", "rounds[0].clean.applied: expected integer, got string '2'"),
    (("rounds", 0, "clean", "deleted_spans"), [[1]], "rounds[0].clean.deleted_spans[0]: expected list of 2, got list"),
    (("rounds", 0, "cached_tokens"), True, "rounds[0].cached_tokens: expected integer or null, got boolean True"),
    (("finish_reason",), "done", "finish_reason: expected one of 'stop', 'length', 'context_overflow', 'error'"),
    (("id",), KeyError, "missing field(s) id"),
    (("rounds", 0, "clean"), [], "rounds[0].clean: expected object or null, got list []"),
]


@pytest.mark.parametrize("path, value, message", BAD, ids=[".".join(map(str, b[0])) for b in BAD])
def test_read_rollouts_names_file_line_and_field(tmp_path, path, value, message):
    out = tmp_path / "run.jsonl"
    out.write_text(json.dumps(good_record()) + "\n" + json.dumps(with_change(path, value)) + "\n")
    with pytest.raises(ValueError) as caught:
        read_rollouts(out)
    assert str(caught.value).startswith(f"{out}:2: {message}")


def test_a_good_record_round_trips_with_tuples_and_floats():
    record = good_record()
    record["wall_time_s"] = 1  # JSON may write a float as an integer
    parsed = RolloutRecord.from_dict(record)
    assert parsed.rounds[0].clean.deleted_spans == [(0, 5)] and parsed.wall_time_s == 1.0
    assert RolloutRecord.from_dict(copy.deepcopy(parsed.to_dict())).to_dict() == parsed.to_dict()


def test_endpoints_per_round_and_cleaning_call_round_trip_and_old_records_without_them_still_read():
    record = good_record()
    record["rounds"][0]["endpoint"] = "sglang@http://127.0.0.1:30000"
    record["rounds"][0]["clean"]["endpoint"] = "sglang@http://127.0.0.1:30001"
    parsed = RolloutRecord.from_dict(record)
    assert parsed.rounds[0].endpoint.endswith(":30000") and parsed.rounds[0].clean.endpoint.endswith(":30001")
    old = good_record()
    del old["rounds"][0]["endpoint"], old["rounds"][0]["clean"]["endpoint"]  # written before the fields existed
    parsed = RolloutRecord.from_dict(old)
    assert parsed.rounds[0].endpoint is None and parsed.rounds[0].clean.endpoint is None


def test_eval_reports_a_bad_field_with_exit_2_not_a_traceback(tmp_path, capsys):
    run = tmp_path / "run.jsonl"
    run.write_text(json.dumps(with_change(("rounds", 0, "generated_tokens"), "many")) + "\n")
    parser = argparse.ArgumentParser()
    eval_cli.add_arguments(parser)
    args = parser.parse_args(["--input", str(run), "--output", str(tmp_path / "m.json"), "--no-progress"])
    assert eval_cli.run(args) == 2
    assert f"{run}:1: rounds[0].generated_tokens: expected integer, got string 'many'" in capsys.readouterr().err


def test_expect_and_describe_primitives():
    assert expect(3, int | None, "n") == 3 and expect(None, int | None, "n") is None
    assert describe(str | int | float | None) == "string, integer, number or null"
    with pytest.raises(FieldError, match=r"^x\[1\]: expected integer, got number 1.5$"):
        expect([1, 1.5], list[int], "x")
    with pytest.raises(FieldError, match="expected object"):
        build(CleanRecord, "nope", "clean")


def test_replay_names_the_rollout_and_round_of_a_span_outside_its_text():
    record = RolloutRecord.from_dict(with_change(("rounds", 0, "clean", "deleted_spans"), [[0, 99]]))
    with pytest.raises(ValueError, match=r"rollout \('s', '1', 0\): round 0: span \(0, 99\) outside text of length 7"):
        list(record.replay())
