"""`freelm data prepare`: each converter on rows shaped like its source, the files/manifest, and failing fast offline.

Fixture rows copy each upstream schema (field names and types, as on the
dataset cards and in the datasets' files) with made-up content. No test touches
the network: the Hub and GitHub are replaced by a local folder, by the
``huggingface_hub`` call boundary, or by servers on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from freelm.benchmarks import fetch as fetch_module
from freelm.benchmarks.fetch import Fetched, FetchError, fetch, select_files, sha256_file
from freelm.benchmarks.prepare import MANIFEST_NAME, convert, prepare_benchmark, read_manifest, read_rows, verify
from freelm.benchmarks.sources import BENCHMARKS, BenchmarkDataError, RowRef
from freelm.cli import main
from freelm.data import load_problems

AOPS = "https://artofproblemsolving.com/wiki/index.php/"


def _ref(name: str, index: int = 1) -> RowRef:
    return RowRef(name, "data/train-00000-of-00001.parquet", index)


# (benchmark, upstream row, fields expected in the converted row, malformed row, error fragment)
CASES = [
    (
        "aime24",
        {
            "id": 67,
            "problem": "  Find $x$.\n",
            "solution": "It is $25$.",
            "answer": "025",
            "url": AOPS + "2024_AIME_I_Problems/Problem_2",
            "year": "2024",
        },
        {"id": "2024-I-2", "prompt": "Find $x$.", "answer": "25", "answer_raw": "025", "exam": "AIME 2024 I"},
        {"id": 60, "problem": "p", "solution": "s", "answer": "1000", "url": AOPS + "2024_AIME_II_Problems/Problem_1"},
        "outside 0..999",
    ),
    (
        "aime25",
        {"problem_idx": 16, "problem": "Find $n$.", "answer": 70, "problem_type": ["Number Theory"]},
        {"id": "16", "answer": "70", "answer_raw": "70", "exam": "AIME 2025 II", "problem_number": 1},
        {"problem_idx": 2, "problem": "p", "answer": "seventy", "problem_type": ["Algebra"]},
        "field 'answer' must be an integer",
    ),
    (
        "aime26",
        {"problem_idx": 1, "answer": 7, "problem": "Find $m+n$."},
        {"id": "1", "answer": "7", "exam": "AIME 2026 I", "problem_number": 1},
        {"problem_idx": 31, "answer": 7, "problem": "p"},
        "problem_idx 31 is outside 1..30",
    ),
    (
        "hmmt_feb25",
        {"problem_idx": 3, "problem": "Compute $r$.", "answer": " \\frac{3}{4} ", "problem_type": ["Algebra"]},
        {"id": "3", "answer": "\\frac{3}{4}", "problem_type": ["Algebra"]},
        {"problem_idx": 4, "problem": "", "answer": "1", "problem_type": []},
        "field 'problem' must be a non-empty string",
    ),
    (
        "brumo25",
        {"problem_idx": 1, "problem": "Radius of $C_{100}$?", "answer": "2^{99}", "problem_type": ["Geometry"]},
        {"id": "1", "answer": "2^{99}"},
        {"problem": "p", "answer": "1", "problem_type": []},
        "missing field 'problem_idx'",
    ),
    (
        "cmimc25",
        {"problem_idx": 40, "problem": "How many?", "answer": "2024^{4046}", "problem_type": ["Combinatorics"]},
        {"id": "40", "answer": "2024^{4046}"},
        {"problem_idx": 1, "problem": "p", "answer": None, "problem_type": []},
        "missing field 'answer'",
    ),
    (
        "beyond_aime",
        {"problem": "Find the minimum \\(k\\)\uff0c then stop.", "answer": 3},
        {"id": "1", "answer": "3", "prompt": "Find the minimum \\(k\\)\uff0c then stop."},
        {"problem": "p", "answer": "3.5"},
        "field 'answer' must be an integer",
    ),
    (
        "imo_answerbench",
        {
            "Problem ID": "imo-bench-algebra-001",
            "Problem": "Find all $N$.\n",
            "Short Answer": "$g(x)=2x^{3}+c$ ",
            "Category": "Algebra",
            "Subcategory": "Operation",
            "Source": "IMO Shortlist 2021",
        },
        {
            "id": "imo-bench-algebra-001",
            "prompt": "Find all $N$.",
            "answer": "$g(x)=2x^{3}+c$",
            "category": "Algebra",
            "subcategory": "Operation",
            "origin": "IMO Shortlist 2021",
        },
        {
            "Problem ID": "imo-bench-algebra-002",
            "Problem": "p",
            "Short Answer": "  ",
            "Category": "Algebra",
            "Subcategory": "x",
            "Source": "y",
        },
        "field 'Short Answer' is empty",
    ),
    (
        "imo_answerbench_v2",
        {
            "Problem ID": "imo-bench-geometry-096",
            "Problem": "Find the ratio.",
            "Short Answer": "$\\frac{7}{18}",
            "Category": "Geometry",
            "Subcategory": "x",
            "Source": "y",
        },
        {"id": "imo-bench-geometry-096", "answer": "$\\frac{7}{18}"},
        {"Problem ID": "", "Problem": "p", "Short Answer": "1", "Category": "A", "Subcategory": "x", "Source": "y"},
        "field 'Problem ID' must be a non-empty string",
    ),
    (
        "math500",
        {
            "problem": "Convert $(0,3)$.",
            "solution": "We have $r=3$.",
            "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
            "subject": "Precalculus",
            "level": 2,
            "unique_id": "test/precalculus/807.json",
        },
        {"id": "test/precalculus/807.json", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "level": 2},
        {
            "problem": "p",
            "solution": "s",
            "answer": "1",
            "subject": "Algebra",
            "level": 7,
            "unique_id": "test/a/1.json",
        },
        "level' = 7 is outside 1..5",
    ),
    (
        "amc23",
        {"id": 0, "answer": 27.0, "url": AOPS + "2023_AMC_12A_Problems/Problem_1", "question": "How many miles?"},
        {"id": "0", "answer": "27", "url": AOPS + "2023_AMC_12A_Problems/Problem_1"},
        {"id": 1, "answer": 2.5, "url": "u", "question": "q"},
        "field 'answer' must be an integer, got 2.5",
    ),
    (
        "hle",
        {
            "id": "668825f80a642802bdfeadfa",
            "question": "What is the order of the group?",
            "image": "",
            "image_preview": None,
            "answer": "48",
            "answer_type": "exactMatch",
            "author_name": "A. Author",
            "rationale": "Count cosets.",
            "rationale_image": None,
            "raw_subject": "Mathematics",
            "category": "Math",
            "canary": "CANARY",
        },
        {"id": "668825f80a642802bdfeadfa", "answer": "48", "category": "Math", "canary": "CANARY"},
        {"id": "x", "question": "q", "image": "", "answer": "1", "answer_type": "freeform", "category": "Math"},
        "answer_type 'freeform' is not one of exactMatch, multipleChoice",
    ),
    (
        "freelm_eval",
        {"idx": 3, "problem": "Compute $1+1$.", "answer": 2, "level": "easy"},
        {
            "id": "3",
            "source": "freelm_train-00000-of-00001",
            "prompt": "Compute $1+1$.",
            "answer": "2",
            "level": "easy",
        },
        {"idx": 4, "query": "q", "response": "r"},
        "no problem field (prompt/problem/question) or answer field",
    ),
]


def test_every_benchmark_has_a_case():
    assert sorted(case[0] for case in CASES) == sorted(BENCHMARKS)


@pytest.mark.parametrize(("name", "row", "expected", "bad", "error"), CASES, ids=[case[0] for case in CASES])
def test_converter(name, row, expected, bad, error):
    bench = BENCHMARKS[name]
    out = bench.convert(dict(row), _ref(name))
    assert {key: out.get(key) for key in expected} == expected
    with pytest.raises(BenchmarkDataError) as info:
        bench.convert(dict(bad), _ref(name, 7))
    message = str(info.value)
    assert message.startswith(f"{name}: data/train-00000-of-00001.parquet row 7: ")
    assert error in message


@pytest.mark.parametrize(("name", "row"), [(case[0], case[1]) for case in CASES], ids=[case[0] for case in CASES])
def test_a_row_without_a_field_its_converter_needs_names_the_row_and_the_field(name, row):
    """Each field taken out in turn: the row converts (the field is optional) or the error names row and field."""
    prefix = f"{name}: data/train-00000-of-00001.parquet row 7: "
    for field in row:
        try:
            BENCHMARKS[name].convert({k: v for k, v in row.items() if k != field}, _ref(name, 7))
        except BenchmarkDataError as exc:
            assert str(exc).startswith(prefix) and field in str(exc), (field, str(exc))


def test_field_errors_list_what_the_row_has_and_refuse_booleans():
    imo = dict(next(case[1] for case in CASES if case[0] == "imo_answerbench"))
    ref = _ref("imo_answerbench", 7)
    with pytest.raises(BenchmarkDataError) as info:
        BENCHMARKS["imo_answerbench"].convert({}, ref)
    assert str(info.value) == f"{ref}: missing field 'Problem ID' (fields present: none)"
    with pytest.raises(BenchmarkDataError) as info:
        BENCHMARKS["imo_answerbench"].convert({k: v for k, v in imo.items() if k != "Category"}, ref)
    present = "Problem, Problem ID, Short Answer, Source, Subcategory"
    assert str(info.value) == f"{ref}: missing field 'Category' (fields present: {present})"
    with pytest.raises(BenchmarkDataError) as info:  # JSON true is an int to Python: never the answer "True"
        BENCHMARKS["imo_answerbench"].convert({**imo, "Short Answer": True}, ref)
    assert str(info.value) == f"{ref}: field 'Short Answer' must be a string or an integer, got True"
    with pytest.raises(BenchmarkDataError) as info:
        BENCHMARKS["beyond_aime"].convert({"problem": "p", "answer": True}, _ref("beyond_aime", 7))
    assert str(info.value) == f"{_ref('beyond_aime', 7)}: field 'answer' must be an integer, got True"


def test_hle_keeps_only_text_exact_answer_rows():
    convert_hle = BENCHMARKS["hle"].convert
    base = dict(CASES[[c[0] for c in CASES].index("hle")][1])
    assert convert_hle({**base, "answer_type": "multipleChoice"}, _ref("hle")) is None
    assert convert_hle({**base, "image": "data:image/png;base64,AAAA"}, _ref("hle")) is None
    assert convert_hle(base, _ref("hle"))["prompt"] == "What is the order of the group?"


def test_registry_revisions_are_pinned_or_say_so():
    for bench in BENCHMARKS.values():
        source = bench.source
        if source.pinned:
            assert len(source.revision) == 40 and int(source.revision, 16) >= 0, bench.name
        else:
            assert "unpinned: confirm" in source.note, bench.name
        assert source.host in ("hf", "github")
        assert bench.normalisation and bench.license


def test_prepare_help_lists_every_benchmark_with_source_and_revision(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "prepare", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for bench in BENCHMARKS.values():
        line = next(line for line in text.splitlines() if line.strip().startswith(bench.name + " "))
        assert bench.source.repo in line and bench.source.revision in line


# --------------------------------------------------------------------------- files, manifest, idempotency


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _math500_repo(root: Path, count: int = 500) -> Path:
    rows = [
        {
            "problem": f"Problem {i}?",
            "solution": "s",
            "answer": str(i),
            "subject": "Algebra",
            "level": 1 + i % 5,
            "unique_id": f"test/algebra/{i}.json",
        }
        for i in range(count)
    ]
    _write_jsonl(root / "test.jsonl", rows)
    (root / "README.md").write_text("card\n")
    return root


def test_prepare_from_local_copy_writes_rows_and_manifest(tmp_path):
    repo = _math500_repo(tmp_path / "MATH-500")
    out = tmp_path / "bench"
    result = prepare_benchmark(BENCHMARKS["math500"], out, tmp_path, local_dir=repo)
    assert not result.kept and result.rows == 500
    lines = (out / "math500.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    assert list(first)[:4] == ["id", "source", "prompt", "answer"]
    assert first == {
        "id": "test/algebra/0.json",
        "source": "math500",
        "prompt": "Problem 0?",
        "answer": "0",
        "subject": "Algebra",
        "level": 1,
    }
    entry = read_manifest(out)["files"]["math500.jsonl"]
    assert entry["source"] == "hf:HuggingFaceH4/MATH-500"
    assert entry["revision"] == BENCHMARKS["math500"].source.revision
    assert entry["rows"] == 500 and entry["sha256"] == sha256_file(out / "math500.jsonl")
    assert entry["upstream_files"] == {"test.jsonl": sha256_file(repo / "test.jsonl")}
    assert entry["origin"] == f"local:{repo}" and entry["commit"] is None
    # the written file is what the runner loads
    problems = load_problems(out / "math500.jsonl")
    assert len(problems) == 500 and problems[0].key == ("math500", "test/algebra/0.json")


def test_prepare_is_idempotent_and_verify_rehashes(tmp_path):
    repo = _math500_repo(tmp_path / "MATH-500")
    out = tmp_path / "bench"
    bench = BENCHMARKS["math500"]
    prepare_benchmark(bench, out, tmp_path, local_dir=repo)
    before = (out / "math500.jsonl").stat().st_mtime_ns
    again = prepare_benchmark(bench, out, tmp_path, local_dir=tmp_path / "does-not-exist")
    assert again.kept and (out / "math500.jsonl").stat().st_mtime_ns == before  # no fetch at all
    assert verify(out) == [("math500.jsonl", None)]
    with (out / "math500.jsonl").open("a") as f:
        f.write("\n")
    [(name, problem)] = verify(out)
    assert name == "math500.jsonl" and "differs from the manifest" in problem
    # a changed file is not "up to date": it is rewritten from the source
    assert not prepare_benchmark(bench, out, tmp_path, local_dir=repo).kept
    assert verify(out, ["math500", "aime24"])[1] == (
        "aime24.jsonl",
        f"not in {out / MANIFEST_NAME}: run `freelm data prepare aime24`",
    )


def test_row_count_differing_from_the_pinned_revision_is_an_error(tmp_path):
    repo = _math500_repo(tmp_path / "MATH-500", count=499)
    with pytest.raises(BenchmarkDataError, match="math500: 499 rows .* the pinned revision has 500"):
        prepare_benchmark(BENCHMARKS["math500"], tmp_path / "bench", tmp_path, local_dir=repo)
    assert not (tmp_path / "bench" / "math500.jsonl").exists()
    # another revision may legitimately differ
    result = prepare_benchmark(BENCHMARKS["math500"], tmp_path / "bench", tmp_path, revision="v2", local_dir=repo)
    assert result.rows == 499 and read_manifest(tmp_path / "bench")["files"]["math500.jsonl"]["revision"] == "v2"


def test_duplicate_ids_and_malformed_rows_name_benchmark_and_row(tmp_path):
    rows = [{"problem": "p", "answer": 1}, {"problem": "q", "answer": "x"}]
    _write_jsonl(tmp_path / "repo" / "test.jsonl", rows)
    fetched = Fetched(tmp_path / "repo", ["test.jsonl"], None, "local")
    with pytest.raises(BenchmarkDataError, match=r"^beyond_aime: test.jsonl row 2: field 'answer' must be an integer"):
        convert(BENCHMARKS["beyond_aime"], fetched)
    rows = [{"problem_idx": 1, "problem": "p", "answer": "1"}, {"problem_idx": 1, "problem": "q", "answer": "2"}]
    _write_jsonl(tmp_path / "repo" / "test.jsonl", rows)
    with pytest.raises(
        BenchmarkDataError, match=r"test.jsonl row 2: duplicate id '1' .*first at hmmt_feb25: test.jsonl row 1"
    ):
        convert(BENCHMARKS["hmmt_feb25"], fetched)


def test_freelm_eval_reads_every_file_outside_train(tmp_path):
    repo = tmp_path / "FreeLM"
    _write_jsonl(repo / "train" / "train.jsonl", [{"prompt": "x", "completion": "y"}])
    _write_jsonl(repo / "eval" / "aime24.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}])
    _write_jsonl(repo / "eval" / "hmmt.jsonl", [{"question": "c", "gt": "3", "id": 9}])
    result = prepare_benchmark(BENCHMARKS["freelm_eval"], tmp_path / "out", tmp_path, local_dir=repo)
    rows = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert [(r["source"], r["id"], r["answer"]) for r in rows] == [
        ("freelm_aime24", "1", "1"),
        ("freelm_aime24", "2", "2"),
        ("freelm_hmmt", "9", "3"),
    ]


def test_aime24_parquet_from_the_hub_layout_sorted_by_exam(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = []
    for exam in ("I", "II"):
        for number in range(1, 16):
            rows.append(
                {
                    "id": 60 + len(rows),
                    "problem": f"AIME {exam} problem {number}",
                    "solution": "s",
                    "answer": f"{number:03d}",
                    "url": f"{AOPS}2024_AIME_{exam}_Problems/Problem_{number}",
                    "year": "2024",
                }
            )
    rows.sort(key=lambda r: r["url"])  # upstream order: Problem_1, Problem_10, Problem_11, ...
    path = tmp_path / "aime_2024" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = prepare_benchmark(BENCHMARKS["aime24"], tmp_path / "out", tmp_path, local_dir=tmp_path / "aime_2024")
    out = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert [r["id"] for r in out[:3]] == ["2024-I-1", "2024-I-2", "2024-I-3"] and out[-1]["id"] == "2024-II-15"
    assert out[1]["answer"] == "2" and out[1]["answer_raw"] == "002"


@pytest.mark.parametrize("name", ["aime25", "aime26"])
@pytest.mark.parametrize(("index", "exam", "number"), [(1, "I", 1), (15, "I", 15), (16, "II", 1), (30, "II", 15)])
def test_matharena_aime_numbering_puts_15_in_exam_i_and_16_first_in_exam_ii(name, index, exam, number):
    year = name.removeprefix("aime")
    row = BENCHMARKS[name].convert({"problem_idx": index, "problem": "Find $n$.", "answer": "042"}, _ref(name, index))
    assert (row["id"], row["exam"], row["problem_number"]) == (str(index), f"AIME 20{year} {exam}", number)
    assert (row["answer"], row["answer_raw"]) == ("42", "042")


@pytest.mark.parametrize("index", [0, -1, 31])
def test_matharena_aime_indices_outside_one_to_thirty_name_the_row(index):
    with pytest.raises(BenchmarkDataError, match=r"^aime25: data/train-00000-of-00001.parquet row 3: "):
        BENCHMARKS["aime25"].convert({"problem_idx": index, "problem": "p", "answer": 1}, _ref("aime25", 3))


def test_aime25_parquet_from_the_hub_layout_numbers_both_exams(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"problem_idx": i, "problem": f"Problem {i}.", "answer": str(i), "problem_type": ["Algebra"]}
        for i in range(1, 31)
    ]
    path = tmp_path / "aime_2025" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = prepare_benchmark(BENCHMARKS["aime25"], tmp_path / "out", tmp_path, local_dir=tmp_path / "aime_2025")
    lines = {line["id"]: line for line in map(json.loads, result.path.read_text().splitlines())}
    problems = {problem.id: problem for problem in load_problems(result.path)}
    assert sorted(lines, key=int) == sorted(problems, key=int) == [str(i) for i in range(1, 31)]
    for index in range(1, 31):
        exam, number = ("I", index) if index <= 15 else ("II", index - 15)
        line = lines[str(index)]
        assert (line["exam"], line["problem_number"], line["answer"]) == (f"AIME 2025 {exam}", number, str(index))
        assert problems[str(index)].prompt == f"Problem {index}." and problems[str(index)].source == "aime25"


def test_csv_with_unbalanced_quote_names_the_row(tmp_path):
    path = tmp_path / "answerbench.csv"
    path.write_text(
        'Problem ID,Problem,Short Answer,Category,Subcategory,Source\na-1,"ok",1,Algebra,x,y\na-2,"broken,2,Algebra,x,y\n'
    )
    with pytest.raises(BenchmarkDataError, match=r"^imo_answerbench: answerbench.csv row 2: 6 columns expected"):
        read_rows(path, BENCHMARKS["imo_answerbench"], "answerbench.csv")


def test_select_files_takes_the_first_matching_alternative():
    source = BENCHMARKS["beyond_aime"].source
    assert select_files(["README.md", "test.parquet", "test.jsonl"], source) == ["test.parquet"]
    assert select_files(["README.md", "data/test-00000-of-00001.parquet", "test.parquet"], source) == [
        "data/test-00000-of-00001.parquet"
    ]
    assert select_files(["train/train.jsonl", "eval/a.jsonl"], BENCHMARKS["freelm_eval"].source) == ["eval/a.jsonl"]


# --------------------------------------------------------------------------- the download paths, without network


def _imo_csv(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["Problem ID,Problem,Short Answer,Category,Subcategory,Source"]
    lines += [
        f'imo-bench-algebra-{i:03d},"Problem {i}\n",{i},Algebra,Inequality,IMO Shortlist 2021' for i in range(400)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_pinned_hash_is_checked_for_a_local_copy(tmp_path):
    _imo_csv(tmp_path / "superhuman" / "imobench" / "answerbench.csv")
    bench = BENCHMARKS["imo_answerbench"]
    with pytest.raises(FetchError, match="has SHA-256 .* but the file at the pinned revision"):
        fetch(bench, bench.source.revision, tmp_path, tmp_path / "superhuman")
    fetched = fetch(bench, "a" * 40, tmp_path, tmp_path / "superhuman")
    assert fetched.files == ["imobench/answerbench.csv"]


class _CSVHandler(http.server.BaseHTTPRequestHandler):
    body = b""
    paths: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server API)
        type(self).paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_github_download_over_http(tmp_path, monkeypatch):
    _CSVHandler.body = _imo_csv(tmp_path / "answerbench.csv").read_bytes()
    server = http.server.HTTPServer(("127.0.0.1", 0), _CSVHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(fetch_module, "GITHUB_RAW", f"http://127.0.0.1:{server.server_port}")
        bench = BENCHMARKS["imo_answerbench"]
        result = prepare_benchmark(bench, tmp_path / "out", tmp_path / "work", revision="b" * 40)
    finally:
        server.shutdown()
    assert _CSVHandler.paths == [f"/google-deepmind/superhuman/{'b' * 40}/imobench/answerbench.csv"]
    assert result.rows == 400
    entry = read_manifest(tmp_path / "out")["files"]["imo_answerbench.jsonl"]
    assert entry["origin"] == "github" and entry["commit"] == "b" * 40


def _hub():
    """``huggingface_hub`` with its ``constants`` submodule loaded: the package exposes it only once imported."""
    pytest.importorskip("huggingface_hub.constants")
    return pytest.importorskip("huggingface_hub")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_github_unreachable_fails_as_a_network_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "GITHUB_RAW", f"http://127.0.0.1:{_closed_port()}")
    bench = BENCHMARKS["imo_answerbench"]
    with pytest.raises(FetchError, match="imo_answerbench: cannot reach .*--from imo_answerbench=DIR") as info:
        fetch(bench, bench.source.revision, tmp_path)
    assert info.value.network


def test_hub_download_goes_through_huggingface_hub(tmp_path, monkeypatch):
    """The Hub path: one probe for the commit, then ``snapshot_download`` of just the benchmark's files."""
    hub = _hub()
    snapshot = _math500_repo(tmp_path / "snapshots" / ("c" * 40))
    calls = {}

    class Info:
        sha = "c" * 40

    def dataset_info(self, repo_id, revision=None, timeout=None):
        calls["probe"] = (repo_id, revision, timeout)
        return Info()

    def snapshot_download(repo_id, **kwargs):
        calls["download"] = (repo_id, kwargs)
        return str(snapshot)

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    bench = BENCHMARKS["math500"]
    prepare_benchmark(bench, tmp_path / "out", tmp_path)
    assert calls["probe"] == ("HuggingFaceH4/MATH-500", bench.source.revision, fetch_module.PROBE_TIMEOUT)
    repo_id, kwargs = calls["download"]
    assert repo_id == "HuggingFaceH4/MATH-500" and kwargs["repo_type"] == "dataset"
    assert kwargs["revision"] == "c" * 40 and kwargs["allow_patterns"] == ["test.jsonl"]
    assert not kwargs["local_files_only"]
    entry = read_manifest(tmp_path / "out")["files"]["math500.jsonl"]
    assert entry["commit"] == "c" * 40 and entry["origin"] == "hub"


def test_gated_dataset_says_how_to_get_access(monkeypatch, tmp_path):
    hub = _hub()
    from huggingface_hub import errors

    def refuse(*args, **kwargs):
        raise errors.GatedRepoError("403 gated", response=_Response(403))

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.HfApi, "dataset_info", refuse)
    with pytest.raises(FetchError, match=r"hle: cais/hle is gated: log in at https://huggingface.co/datasets/cais/hle"):
        fetch(BENCHMARKS["hle"], "main", tmp_path)


class _Response:
    """Just enough of an HTTP response for huggingface_hub's error classes."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        self.headers: dict[str, str] = {}
        self.request = None
        self.url = "http://127.0.0.1/"

    def json(self):
        return {}


def test_hub_probe_is_one_request_then_fails(tmp_path, monkeypatch):
    """A host that drops every connection: huggingface_hub alone retries 5 times with back-off (~30 s)."""
    hub = _hub()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []

    def drop_connections():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                accepted.append(conn.recv(200).split(b" HTTP/")[0].decode())
            except OSError:
                pass
            conn.close()

    threading.Thread(target=drop_connections, daemon=True).start()
    try:
        monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub.constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        with pytest.raises(
            FetchError, match="aime24: HuggingFaceH4/aime_2024 at .*: cannot reach the Hugging Face Hub"
        ):
            fetch(BENCHMARKS["aime24"], BENCHMARKS["aime24"].source.revision, tmp_path)
    finally:
        listener.close()
    # huggingface_hub may also fetch its own registry once (/api/agent-harnesses); the dataset is asked once
    assert [line for line in accepted if "/api/datasets/" in line] == [
        f"GET /api/datasets/HuggingFaceH4/aime_2024/revision/{BENCHMARKS['aime24'].source.revision}"
    ]


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
    full_env.pop("HF_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "freelm.cli", "data", "prepare", *args, "--out", str(tmp_path / "out")],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_offline_names_the_benchmark_and_hf_hub_offline(tmp_path):
    done = _cli(tmp_path, {"HF_HUB_OFFLINE": "1"}, "aime25", "imo_answerbench")
    assert done.returncode == 1
    assert "error: aime25: MathArena/aime_2025 at c94da77e" in done.stderr
    assert "HF_HUB_OFFLINE=1 forbids downloading" in done.stderr and "--from aime25=DIR" in done.stderr
    assert "error: imo_answerbench: published on GitHub" in done.stderr
    assert not (tmp_path / "out" / "aime25.jsonl").exists()


def test_cli_unreachable_endpoint_stops_at_the_first_benchmark(tmp_path):
    done = _cli(tmp_path, {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_OFFLINE": "0"}, "aime24", "hle")
    assert done.returncode == 1
    assert "error: aime24: HuggingFaceH4/aime_2024 at 2fe88a2f" in done.stderr
    assert "cannot reach the Hugging Face Hub" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    assert "not tried (same network problem): hle" in done.stderr
    assert "Retrying" not in done.stderr


def test_cli_argument_errors(capsys):
    assert main(["data", "prepare", "nope"]) == 2
    assert "unknown benchmark(s) nope" in capsys.readouterr().err
    assert main(["data", "prepare"]) == 2
    assert main(["data", "prepare", "aime24", "aime25", "--revision", "abc"]) == 2
    assert "--revision NAME=abc" in capsys.readouterr().err


def test_cli_list_shows_status(tmp_path, capsys):
    repo = _math500_repo(tmp_path / "MATH-500")
    assert main(["data", "prepare", "math500", "--from", f"math500={repo}", "--out", str(tmp_path / "b")]) == 0
    assert main(["data", "list", "--out", str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert f"math500: MATH-500 (PRM800K test split) [prepared in {tmp_path / 'b'} (500 rows)]" in text
    assert "aime24: AIME 2024 (I and II) [not prepared]" in text
    assert "gated: accept the terms at https://huggingface.co/datasets/cais/hle" in text


@pytest.mark.parametrize("offline", [True, False])
def test_hub_cache_is_used_offline_or_when_the_hub_does_not_answer(tmp_path, monkeypatch, offline):
    hub = _hub()
    snapshot = _math500_repo(tmp_path / "snapshots" / ("d" * 40))
    calls = []

    def unreachable(self, *args, **kwargs):
        raise ConnectionRefusedError("refused")

    def snapshot_download(repo_id, **kwargs):
        calls.append(kwargs["local_files_only"])
        return str(snapshot)

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    fetched = fetch(BENCHMARKS["math500"], BENCHMARKS["math500"].source.revision, tmp_path)
    assert calls == [True]  # the cache only: nothing downloaded
    assert fetched.origin == "hub-cache" and fetched.commit == "d" * 40 and fetched.files == ["test.jsonl"]


def test_v2_csv_defect_is_repaired_before_parsing(tmp_path):
    """Upstream answerbench_v2.csv lacks one closing quote; the pinned file is repaired, any other file refused."""
    header = "Problem ID,Problem,Short Answer,Category,Subcategory,Source\n"
    broken = (
        'imo-bench-algebra-036,"Find all functions $Y$:\n\\[\na Y(a)=b\n\\]\n,"$Y(x)=A+\\frac{B}{x}-x$",'
        "Algebra,Functional Equation,Iran 2002\n"
    )
    path = tmp_path / "answerbench_v2.csv"
    path.write_text(header + broken, encoding="utf-8")
    bench = BENCHMARKS["imo_answerbench_v2"]
    [row] = read_rows(path, bench, "imobench/answerbench_v2.csv")
    out = bench.convert(row, RowRef(bench.name, "imobench/answerbench_v2.csv", 1))
    assert out["answer"] == "$Y(x)=A+\\frac{B}{x}-x$" and out["category"] == "Algebra"
    assert out["prompt"] == "Find all functions $Y$:\n\\[\na Y(a)=b\n\\]"
    path.write_text(header + broken.replace('\\]\n,"', '\\]\n","'), encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match="occurs 0 times, not once: the file is not the pinned one"):
        read_rows(path, bench, "imobench/answerbench_v2.csv")
