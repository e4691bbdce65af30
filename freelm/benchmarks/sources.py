"""The benchmark registry: where each benchmark comes from and its converter to freelm's problem rows.

Every entry pins an upstream revision (a full commit hash where one was
confirmed; otherwise a branch, said so in ``Source.note``) and registers one
small converter by name, the way backends and cleaners are chosen by name. A
converter turns one upstream row into ``{"id", "prompt", "answer", ...}``
(``source`` is added by the writer) and raises :class:`BenchmarkDataError`
naming the benchmark, file and row for a row it cannot read. The field names,
splits and row counts were read from the datasets' own cards and files; the
per-benchmark normalisation is the ``normalisation`` line of each entry (shown
by ``freelm data list`` and in docs/evaluation.md).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class BenchmarkDataError(ValueError):
    """An upstream row (or file) a converter cannot read; the message names benchmark, file and row."""


@dataclass(frozen=True)
class RowRef:
    """Where a row came from, for error messages (``index`` is 1-based within its file)."""

    benchmark: str
    file: str
    index: int

    def __str__(self) -> str:
        return f"{self.benchmark}: {self.file} row {self.index}"


@dataclass(frozen=True)
class Source:
    """An upstream dataset at a revision.

    ``host`` is ``"hf"`` (a Hugging Face dataset repository, fetched with
    ``huggingface_hub``) or ``"github"`` (files of a GitHub repository at a
    commit, for a benchmark published only there). ``files`` are alternatives,
    each a glob over repository paths (``*`` spans ``/``, as in
    ``huggingface_hub``'s ``allow_patterns``): the first that matches any file
    is used, so a layout that differs between revisions still resolves.
    """

    host: str
    repo: str
    revision: str
    files: tuple[str, ...]
    #: False when ``revision`` is a branch: the manifest then records the commit actually fetched.
    pinned: bool = True
    note: str = ""
    gated: bool = False
    #: SHA-256 of the (single) upstream file at ``revision``, checked after download when known.
    sha256: str | None = None
    #: Parquet columns to read (None: all); HLE's image columns are large and unused.
    columns: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    #: ``(broken, fixed)`` text replacements for a known defect of the upstream file (each must occur once).
    repairs: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"{self.host}:{self.repo}"

    def url(self) -> str:
        if self.host == "hf":
            return f"https://huggingface.co/datasets/{self.repo}"
        return f"https://github.com/{self.repo}"


Converter = Callable[[dict[str, Any], RowRef], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Benchmark:
    """One registered benchmark: its source, converter, expected size and documented normalisation."""

    name: str
    title: str
    source: Source
    convert: Converter
    normalisation: str
    license: str
    #: Output rows at the pinned revision (None: not confirmed); a mismatch at the pinned revision is an error.
    rows: int | None = None
    sort_key: Callable[[dict[str, Any]], Any] | None = None
    #: Bumped when the converter's output changes, so `prepare` rewrites files made by an older one.
    version: int = 1


BENCHMARKS: dict[str, Benchmark] = {}


def register(name: str, **fields: Any) -> Callable[[Converter], Converter]:
    """Register the decorated converter as benchmark ``name`` (the other fields as in :class:`Benchmark`)."""

    def decorate(convert: Converter) -> Converter:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} registered twice")
        BENCHMARKS[name] = Benchmark(name=name, convert=convert, **fields)
        return convert

    return decorate


# --------------------------------------------------------------------------- field helpers


def _field(row: dict[str, Any], name: str, ref: RowRef) -> Any:
    if name not in row or row[name] is None:
        present = ", ".join(sorted(row)) or "none"
        raise BenchmarkDataError(f"{ref}: missing field {name!r} (fields present: {present})")
    return row[name]


def _text(row: dict[str, Any], name: str, ref: RowRef) -> str:
    """A required non-empty string field, surrounding whitespace stripped."""
    value = _field(row, name, ref)
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkDataError(f"{ref}: field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _answer_text(row: dict[str, Any], name: str, ref: RowRef) -> str:
    """A verbatim answer (LaTeX or a number), stripped; numbers become their decimal string."""
    value = _field(row, name, ref)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BenchmarkDataError(f"{ref}: field {name!r} must be a string or an integer, got {value!r}")
    text = str(value).strip()
    if not text:
        raise BenchmarkDataError(f"{ref}: field {name!r} is empty")
    return text


def _integer(row: dict[str, Any], name: str, ref: RowRef, lo: int | None = None, hi: int | None = None) -> int:
    """An integer answer given as an int, an integral float (``27.0``) or a decimal string (``"025"``)."""
    value = _field(row, name, ref)
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        number = int(value)
    if number is None:
        raise BenchmarkDataError(f"{ref}: field {name!r} must be an integer, got {value!r}")
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        raise BenchmarkDataError(f"{ref}: field {name!r} = {number} is outside {lo}..{hi}")
    return number


def _aime_answer(row: dict[str, Any], ref: RowRef) -> dict[str, Any]:
    """AIME answers are integers 0-999: written without leading zeros, the source value kept in ``answer_raw``."""
    number = _integer(row, "answer", ref, 0, 999)
    return {"answer": str(number), "answer_raw": str(row["answer"]).strip()}


# --------------------------------------------------------------------------- converters

_MATHARENA = "CC BY-NC-SA 4.0 (dataset card)"
_AIME_URL = re.compile(r"(\d{4})_AIME_(I{1,2})_Problems/Problem_(\d+)")
_AIME_NOTE = "answer: integer without leading zeros ('025' -> '25'), source value in answer_raw"


def _aime_sort(row: dict[str, Any]) -> tuple[str, int]:
    return (row["exam"], row["problem_number"])


@register(
    "aime24",
    title="AIME 2024 (I and II)",
    source=Source(
        "hf",
        "HuggingFaceH4/aime_2024",
        "2fe88a2f1091d5048c0f36abc874fb997b3dd99a",
        ("data/train-*.parquet",),
    ),
    rows=30,
    normalisation=f"id '2024-I-1' from the AoPS url (rows sorted by exam, problem); {_AIME_NOTE}; "
    "source id in source_id; solution dropped",
    license="not declared on the dataset card",
    sort_key=_aime_sort,
)
def aime24(row: dict[str, Any], ref: RowRef) -> dict[str, Any]:
    url = _text(row, "url", ref)
    match = _AIME_URL.search(url)
    if not match:
        raise BenchmarkDataError(f"{ref}: url {url!r} does not name an AIME problem (YEAR_AIME_I_Problems/Problem_N)")
    year, exam, number = match.group(1), match.group(2), int(match.group(3))
    return {
        "id": f"{year}-{exam}-{number}",
        "prompt": _text(row, "problem", ref),
        **_aime_answer(row, ref),
        "exam": f"AIME {year} {exam}",
        "problem_number": number,
        "source_id": _field(row, "id", ref),
        "url": url,
    }


def _matharena(row: dict[str, Any], ref: RowRef) -> dict[str, Any]:
    """MathArena rows: ``problem_idx``, ``problem``, ``answer``, optional ``problem_type`` (a list)."""
    out = {
        "id": str(_integer(row, "problem_idx", ref, 1)),
        "prompt": _text(row, "problem", ref),
        "answer": _answer_text(row, "answer", ref),
    }
    if row.get("problem_type") is not None:
        out["problem_type"] = list(row["problem_type"])
    return out


def _matharena_aime(row: dict[str, Any], ref: RowRef, *, year: int) -> dict[str, Any]:
    """One 30-problem AIME year: problem_idx 1-15 is exam I, 16-30 exam II."""
    out = _matharena(row, ref)
    index = int(out["id"])
    if index > 30:
        raise BenchmarkDataError(f"{ref}: problem_idx {index} is outside 1..30")
    out.update(_aime_answer(row, ref))
    out["exam"] = f"AIME {year} {'I' if index <= 15 else 'II'}"
    out["problem_number"] = index if index <= 15 else index - 15
    return out


# MathArena publishes each competition as its own dataset with one schema: one converter for AIME
# years and one for LaTeX-answer competitions, registered under every competition's name.
_MATHARENA_AIME = f"id = problem_idx; {_AIME_NOTE}; exam/problem_number added (1-15 = I, 16-30 = II)"
_MATHARENA_LATEX = "id = problem_idx; answer verbatim (LaTeX), stripped; problem_type kept"
for _name, _title, _repo, _revision, _rows, _convert, _normalisation in (
    ("aime25", "AIME 2025 (I and II)", "aime_2025", "c94da77eb22bbd6439e62a323bec18493a421302", 30,
     functools.partial(_matharena_aime, year=2025), _MATHARENA_AIME),
    ("aime26", "AIME 2026 (I and II), extra", "aime_2026", "d2de22f3c656b4f56cf8981212186377d1e23bc3", 30,
     functools.partial(_matharena_aime, year=2026), _MATHARENA_AIME),
    ("hmmt_feb25", "HMMT February 2025", "hmmt_feb_2025", "6fdc4277120810ff75aa22d2d5489b91f7a262a1", 30,
     _matharena, _MATHARENA_LATEX),
    ("brumo25", "BrUMO 2025", "brumo_2025", "6de9bc0987f5710c6376ee980e1483dbeb55cfda", 30,
     _matharena, _MATHARENA_LATEX),
    ("cmimc25", "CMIMC 2025, extra", "cmimc_2025", "8f27517ce4ad1d05e023c0e7eca4344754ba2a04", 40,
     _matharena, _MATHARENA_LATEX),
):  # fmt: skip
    register(
        _name,
        title=_title,
        source=Source("hf", f"MathArena/{_repo}", _revision, ("data/train-*.parquet",)),
        rows=_rows,
        normalisation=_normalisation,
        license=_MATHARENA,
    )(_convert)


@register(
    "beyond_aime",
    title="BeyondAIME (ByteDance Seed)",
    source=Source(
        "hf",
        "ByteDance-Seed/BeyondAIME",
        "main",
        ("data/test-*.parquet", "*test*.parquet", "*test*.jsonl"),
        pinned=False,
        note="main, unpinned: confirm (no commit hash could be confirmed; the manifest records the commit fetched)",
    ),
    rows=100,
    normalisation="id = 1-based row number (source order); answer: integer as a decimal string; "
    "full-width punctuation in prompts kept",
    license="see the dataset card",
)
def beyond_aime(row: dict[str, Any], ref: RowRef) -> dict[str, Any]:
    return {"id": str(ref.index), "prompt": _text(row, "problem", ref), "answer": str(_integer(row, "answer", ref))}


_IMO_NOTE = (
    "CSV columns Problem ID/Problem/Short Answer/Category/Subcategory/Source -> "
    "id/prompt/answer/category/subcategory/origin; answer verbatim, stripped"
)
_IMO_LICENSE = "CC BY 4.0 (repository README; code Apache-2.0)"


def _imo_answerbench(row: dict[str, Any], ref: RowRef) -> dict[str, Any]:
    return {
        "id": _text(row, "Problem ID", ref),
        "prompt": _text(row, "Problem", ref),
        "answer": _answer_text(row, "Short Answer", ref),
        "category": _text(row, "Category", ref),
        "subcategory": _text(row, "Subcategory", ref),
        "origin": _text(row, "Source", ref),
    }


register(
    "imo_answerbench",
    title="IMO-AnswerBench (Google DeepMind), v1: the original 2025-10-27 release",
    source=Source(
        "github",
        "google-deepmind/superhuman",
        "92ae8c2e88dee12a3f793dd88a5e80ed76754c2a",
        ("imobench/answerbench.csv",),
        note="published on GitHub only; fetched from raw.githubusercontent.com at the commit",
        sha256="37aeca686ce677f93580821cfe16a0c0e45872479a502df43272e099da37d8fa",
    ),
    rows=400,
    normalisation=_IMO_NOTE,
    license=_IMO_LICENSE,
)(_imo_answerbench)

register(
    "imo_answerbench_v2",
    title="IMO-AnswerBench v2 (2026-02-12 corrections: 10 answers, 23 statements), extra",
    source=Source(
        "github",
        "google-deepmind/superhuman",
        "a02069ef66dbae4c5b0713ba0dc144a35375558f",
        ("imobench/answerbench_v2.csv",),
        note="published on GitHub only; the row imo-bench-algebra-036 lacks the closing quote of its Problem "
        "field upstream (a CSV reader shifts its columns): the quote is restored before parsing",
        sha256="275877a9d988d85278fad3a5f8a41d7f83393a60bf259531ec0a5161e6b21cf9",
        repairs=(('\\]\n,"$Y(x)=A+\\frac{B}{x}-x$",Algebra', '\\]\n","$Y(x)=A+\\frac{B}{x}-x$",Algebra'),),
    ),
    rows=400,
    normalisation=_IMO_NOTE + "; geometry-096's answer '$\\frac{7}{18}' (no closing $) kept verbatim",
    license=_IMO_LICENSE,
)(_imo_answerbench)


@register(
    "math500",
    title="MATH-500 (PRM800K test split)",
    source=Source("hf", "HuggingFaceH4/MATH-500", "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be", ("test.jsonl",)),
    rows=500,
    normalisation="id = unique_id; answer verbatim; subject and level kept; solution dropped",
    license="not declared on the dataset card (MATH is MIT)",
)
def math500(row: dict[str, Any], ref: RowRef) -> dict[str, Any]:
    return {
        "id": _text(row, "unique_id", ref),
        "prompt": _text(row, "problem", ref),
        "answer": _answer_text(row, "answer", ref),
        "subject": _text(row, "subject", ref),
        "level": _integer(row, "level", ref, 1, 5),
    }


@register(
    "amc23",
    title="AMC 2023 (12A/12B, integer-answer rewrite)",
    source=Source(
        "hf", "math-ai/amc23", "80815d37005feb82cd7f8fbc6901d5d3eff43057", ("test-*.parquet", "*test*.parquet")
    ),
    rows=40,
    normalisation="id = source id; answer: integer (int or integral float upstream) as a decimal string; url kept",
    license="not declared on the dataset card",
)
def amc23(row: dict[str, Any], ref: RowRef) -> dict[str, Any]:
    return {
        "id": str(_integer(row, "id", ref)),
        "prompt": _text(row, "question", ref),
        "answer": str(_integer(row, "answer", ref)),
        "url": _text(row, "url", ref),
    }


HLE_ANSWER_TYPES = ("exactMatch", "multipleChoice")


@register(
    "hle",
    title="Humanity's Last Exam, text-only exact-answer subset",
    source=Source(
        "hf",
        "cais/hle",
        "main",
        ("data/test-*.parquet",),
        pinned=False,
        gated=True,
        note="gated: accept the terms at https://huggingface.co/datasets/cais/hle, then `hf auth login` "
        "or set HF_TOKEN; main, unpinned: confirm (the manifest records the commit fetched)",
        columns=("id", "question", "image", "answer", "answer_type", "raw_subject", "category", "canary"),
    ),
    rows=None,
    normalisation="only rows with no image and answer_type exactMatch; prompt = question; answer verbatim; "
    "category, raw_subject and the canary string kept; rationale and images dropped",
    license="MIT (dataset card)",
)
def hle(row: dict[str, Any], ref: RowRef) -> dict[str, Any] | None:
    answer_type = _text(row, "answer_type", ref)
    if answer_type not in HLE_ANSWER_TYPES:
        raise BenchmarkDataError(f"{ref}: answer_type {answer_type!r} is not one of {', '.join(HLE_ANSWER_TYPES)}")
    if answer_type != "exactMatch" or (row.get("image") or "").strip():
        return None
    return {
        "id": _text(row, "id", ref),
        "prompt": _text(row, "question", ref),
        "answer": _answer_text(row, "answer", ref),
        "category": _text(row, "category", ref),
        "raw_subject": _text(row, "raw_subject", ref),
        "canary": row.get("canary", ""),
    }


#: Field names tried, in order, for the paper's own evaluation files (their layout was not confirmed).
FREELM_PROMPT_FIELDS = ("prompt", "problem", "question")
FREELM_ANSWER_FIELDS = ("answer", "gt", "ground_truth", "expected_answer")
FREELM_ID_FIELDS = ("id", "idx", "problem_idx", "unique_id")


def _first_present(row: dict[str, Any], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if row.get(name) is not None), None)


@register(
    "freelm_eval",
    title="Free()LM paper's own evaluation data (every file outside train/)",
    source=Source(
        "hf",
        "ldsjmdy/FreeLM",
        "main",
        ("*.jsonl", "*.parquet"),
        pinned=False,
        exclude=("train/*",),
        note="main, unpinned: confirm; the evaluation files' layout and field names were not confirmed "
        "(only train/train.jsonl was seen), so fields are matched by name and an unknown layout is an error",
    ),
    rows=None,
    normalisation="one row per evaluation row of every file outside train/; source = 'freelm_' + file stem; "
    f"prompt from the first of {'/'.join(FREELM_PROMPT_FIELDS)}, answer from {'/'.join(FREELM_ANSWER_FIELDS)}, "
    f"id from {'/'.join(FREELM_ID_FIELDS)} (else the row number); other fields kept",
    license="see the dataset card",
)
def freelm_eval(row: dict[str, Any], ref: RowRef) -> dict[str, Any]:
    prompt_field = _first_present(row, FREELM_PROMPT_FIELDS)
    answer_field = _first_present(row, FREELM_ANSWER_FIELDS)
    if prompt_field is None or answer_field is None:
        raise BenchmarkDataError(
            f"{ref}: no problem field ({'/'.join(FREELM_PROMPT_FIELDS)}) or answer field "
            f"({'/'.join(FREELM_ANSWER_FIELDS)}); fields present: {', '.join(sorted(row)) or 'none'}"
        )
    id_field = _first_present(row, FREELM_ID_FIELDS)
    stem = ref.file.rsplit("/", 1)[-1].split(".", 1)[0]
    used = {prompt_field, answer_field, id_field, "source"}
    return {
        "id": str(row[id_field]) if id_field else str(ref.index),
        "source": f"freelm_{stem}",
        "prompt": _text(row, prompt_field, ref),
        "answer": _answer_text(row, answer_field, ref),
        **{key: value for key, value in row.items() if key not in used},
    }
