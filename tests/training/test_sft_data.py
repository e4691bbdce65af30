"""SFT rows and ``freelm data check``: exact thinking recovery, every kind of bad row named by file:line."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from freelm.cli import main as freelm_main
from freelm.free import Deletion
from freelm.jsonl import append_jsonl
from freelm.prompts import recover_thinking, render_cleaning_prompt
from freelm.tinymodel import train_tokenizer
from freelm.tokenizer import Tokenizer
from freelm.training.sft_data import build_row, check_file, percentile

THINKING = "Try 7 * 6 = 43. No, that is wrong. 7 * 6 = 42. Done."


def write(path, rows):
    with path.open("w") as f:
        for row in rows:
            append_jsonl(f, row)
    return path


def test_row_is_the_inference_prompt_plus_canonical_json_and_eot():
    row = build_row("What is 7 * 6?", THINKING, [Deletion("Try 7", "wrong.")], id="a", cut_tokens=40)
    assert row["prompt"] == render_cleaning_prompt("What is 7 * 6?", THINKING)
    assert row["completion"] == '[{"prefix": "Try 7", "suffix": "wrong."}]<|im_end|>'
    assert row["id"] == "a" and row["cut_tokens"] == 40 and row["problem"] == "What is 7 * 6?"


pieces = st.sampled_from(list("ab{}#\n ") + ["\n\n## Reasoning so far\n", "{thinking}", "{problem}", "<|im_end|>"])
text = st.lists(pieces, max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(problem=text, thinking=text)
def test_thinking_recovery_is_exact_or_refuses(problem, thinking):
    prompt = render_cleaning_prompt(problem, thinking)
    assert recover_thinking(prompt, problem=problem) == thinking
    try:
        assert recover_thinking(prompt) == thinking  # without the problem: never a wrong answer
    except ValueError as exc:
        assert "unambiguously" in str(exc)


def test_custom_template_and_mismatch(tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("THINK:{thinking}\nPROBLEM:{problem}\nEND")
    prompt = render_cleaning_prompt("p", "t {x}", template)
    assert recover_thinking(prompt, template) == "t {x}"
    with pytest.raises(ValueError, match="does not match the cleaning template"):
        recover_thinking(prompt)  # the built-in template


def test_check_names_every_bad_row(tmp_path):
    good = build_row("P?", THINKING, [Deletion("Try 7", "wrong.")])
    rows = [
        good,
        build_row("P?", THINKING, []),
        {**good, "completion": "not json<|im_end|>"},
        {**good, "completion": '[{"prefix": "Try 7", "suffix": "wrong."}]'},
        build_row("P?", THINKING, [Deletion("7 * 6", "Done.")]),  # "7 * 6" occurs twice
        build_row("P?", THINKING, [Deletion("Try 7", "never")]),
        {**good, "prompt": "something else"},
        {**good, "completion": '[{"prefix": "Try 7", "suffix": "wrong."}, {"prefix": 1}]<|im_end|>'},
        {**good, "completion": '[ {"prefix":"Try 7","suffix":"wrong."} ]<|im_end|>'},
    ]
    path = write(tmp_path / "sft.jsonl", rows)
    report = check_file(path)
    assert report.rows == 9 and report.empty == 1
    errors = "\n".join(report.errors)
    assert f"{path}:3: completion is not a JSON list of deletions (no_json_list)" in errors
    assert f"{path}:4: completion does not end with the end-of-turn token" in errors
    assert f"{path}:5: command" in errors and "prefix_ambiguous" in errors
    assert f"{path}:6: command" in errors and "suffix_not_found" in errors
    assert f"{path}:7: prompt does not match the cleaning template" in errors
    assert f"{path}:8: completion: item 1" in errors
    assert not any(e.startswith((f"{path}:1:", f"{path}:2:", f"{path}:9:")) for e in report.errors)
    assert report.warnings == [f"{path}:9: completion is valid but not in the canonical format_commands() form"]


def test_check_cli_exit_codes_and_token_percentiles(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    train_tokenizer([THINKING], vocab_size=300).save_pretrained(tok_dir)
    rows = [build_row("P?", THINKING, [Deletion("Try 7", "wrong.")]), build_row("P?", THINKING[:30], [])]
    path = write(tmp_path / "ok.jsonl", rows)
    assert freelm_main(["data", "check", str(path), "--tokenizer", str(tok_dir), "--max-length", "10"]) == 0
    out = capsys.readouterr().out
    assert "2 rows, 1 commands, 1 empty" in out and "prompt tokens: min=" in out and "p99=" in out
    assert "rows over max length (the trainer drops them): 2" in out
    report = check_file(path, Tokenizer.from_pretrained(tok_dir))
    assert report.completion_tokens[1] == len(Tokenizer.from_pretrained(tok_dir).encode("[]<|im_end|>"))

    bad = write(tmp_path / "bad.jsonl", [{**rows[0], "completion": "oops"}])
    assert freelm_main(["data", "check", str(bad)]) == 1
    assert f"error: {bad}:1:" in capsys.readouterr().out
    (tmp_path / "broken.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[1]) + "\n")
    assert freelm_main(["data", "check", str(tmp_path / "broken.jsonl")]) == 1
    assert "broken.jsonl:2: not valid JSON" in capsys.readouterr().out
    assert freelm_main(["data", "check", str(tmp_path / "missing.jsonl")]) == 1


def test_percentile_is_nearest_rank():
    assert percentile(list(range(1, 101)), 50) == 50 and percentile(list(range(1, 101)), 99) == 99
    assert percentile([7], 90) == 7 and percentile([3, 1, 2], 100) == 3
