"""freelm template infer: rows rendered from a template give back exactly that template."""

from __future__ import annotations

import json

import pytest
from sft_rows import make_rows

from freelm.cli import main
from freelm.prompts import DEFAULT_CLEAN_TEMPLATE, render_cleaning_prompt
from freelm.template_infer import TemplateMismatch, infer_template

THINKING_FIRST = (
    "Reasoning trace follows.\n<trace>\n{thinking}\n</trace>\nOriginal question: {problem}\n"
    'Reply with [{"prefix": ..., "suffix": ...}] only.\n'
)
CHATML_QWEN = (
    "<|im_start|>user\nProblem:\n{problem}\n\nThinking:\n{thinking}\n\nList the removable spans as JSON."
    "<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATES = {"clean.txt": DEFAULT_CLEAN_TEMPLATE.read_text(), "thinking_first": THINKING_FIRST, "chatml": CHATML_QWEN}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_round_trip(name):
    inferred = infer_template(make_rows(TEMPLATES[name], seed=len(name)))
    assert inferred.template == TEMPLATES[name]
    assert inferred.explained == inferred.rows == 12 and inferred.unparsed == 0
    assert inferred.thinking_first == (name == "thinking_first")


def test_reports_completion_formats_and_unreadable_completions():
    rows = make_rows(CHATML_QWEN, fmt="think")
    rows[0]["completion"] = "I would delete the second step."
    inferred = infer_template(rows)
    assert inferred.template == CHATML_QWEN
    assert inferred.completion_formats == {"think_block": 11, "other": 1} and inferred.unparsed == 1


def test_rows_from_two_templates_are_refused():
    rows = make_rows(CHATML_QWEN, n=8) + make_rows(THINKING_FIRST, n=8, seed=1)
    with pytest.raises(TemplateMismatch, match="rows disagree"):
        infer_template(rows)


def test_cli_writes_a_template_the_runner_reads(tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in make_rows(THINKING_FIRST, fmt="fenced")))
    out = tmp_path / "clean.txt"
    assert main(["template", "infer", "--sft", str(sft), "-o", str(out)]) == 0
    assert out.read_text() == THINKING_FIRST
    printed = capsys.readouterr().out
    assert "explains 12/12 rows exactly" in printed and "fenced 12" in printed and "reads 12/12" in printed
    assert render_cleaning_prompt("p", "t", out) == THINKING_FIRST.replace("{thinking}", "t").replace("{problem}", "p")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["template", "infer", "--sft", str(bad), "-o", str(tmp_path / "no.txt")]) == 2
    assert "bad.jsonl:1: row needs a string 'completion'" in capsys.readouterr().err
    assert not (tmp_path / "no.txt").exists()
