"""Problem loading: validation errors name the file and line."""

import pytest
from repo_paths import SHARED_BENCHMARKS

from freelm.data import load_problems

BENCHMARKS = SHARED_BENCHMARKS


def write(tmp_path, text, name="bench.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_rows_keeps_extra_fields_and_stringifies_ids(tmp_path):
    path = write(tmp_path, '{"id": 1, "prompt": "P1", "answer": 5, "category": "alg"}\n\n{"id": "b", "prompt": "P2"}\n')
    problems = load_problems(path)
    assert [(p.id, p.source, p.answer) for p in problems] == [("1", "bench", "5"), ("b", "bench", None)]
    assert problems[0].extra == {"category": "alg"}
    assert len(load_problems(path, limit=1)) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"id": 1, "prompt": "a"}\nnot json\n', r"bench.jsonl:2: not valid JSON"),
        ('{"id": 1, "prompt": "a"}\n{"id": 2}\n', r"bench.jsonl:2: missing field\(s\) prompt"),
        ('{"prompt": "a"}\n', r"bench.jsonl:1: missing field\(s\) id"),
        ('{"id": 1, "prompt": ["a"]}\n', r"bench.jsonl:1: prompt: expected string, got list \['a'\]"),
        ('{"id": [1, 2], "prompt": "a"}\n', r"bench.jsonl:1: id: expected string or integer, got list \[1, 2\]"),
        ('{"id": true, "prompt": "a"}\n', r"bench.jsonl:1: id: expected string or integer, got boolean True"),
        ('{"id": 1, "prompt": "a", "answer": {"x": 1}}\n', r"bench.jsonl:1: answer: expected string, integer"),
        ('{"id": 1, "prompt": "a", "source": 3}\n', r"bench.jsonl:1: source: expected string or null, got integer"),
        ('{"id": 1, "prompt": "a"}\n{"id": "1", "prompt": "b"}\n', r"bench.jsonl:2: duplicate id '1'.*bench.jsonl:1"),
        ("[1, 2]\n", r"bench.jsonl:1: expected a JSON object"),
        (
            '{"id": 1, "prompt": "ok \\ud83d\\ude00"}\n{"id": 2, "prompt": "x \\ud800 y"}\n',
            r"bench.jsonl:2: prompt: not valid Unicode text: a lone surrogate '\\ud800' at character 2",
        ),
        ('{"id": 1, "prompt": "a", "answer": "\\udfff"}\n', r"bench.jsonl:1: answer: not valid Unicode text"),
        ('{"id": "\\udc00", "prompt": "a"}\n', r"bench.jsonl:1: id: not valid Unicode text"),
        ("", r"no problems"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_problems(write(tmp_path, text))


def test_missing_or_unreadable_file_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_problems(tmp_path / "typo.jsonl")
    with pytest.raises(ValueError, match="not found"):
        load_problems(tmp_path)  # a directory


def test_shared_benchmarks_load():
    if not BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmarks not found at {BENCHMARKS} (the repo must sit beside shared/)")
    counts = {f.stem: len(load_problems(f)) for f in sorted(BENCHMARKS.glob("*.jsonl"))}
    assert counts["aime25"] == 30 and counts["imo_answerbench"] == 400 and counts["math500"] == 500
    assert all(p.answer for f in BENCHMARKS.glob("*.jsonl") for p in load_problems(f))
