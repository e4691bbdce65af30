"""Turning fetched upstream files into ``<out>/<name>.jsonl`` and keeping ``<out>/MANIFEST.json`` true.

The manifest has one entry per written file: the source, the requested
revision and the commit actually fetched, the upstream files with their
SHA-256, the row count and the SHA-256 of the written file. Preparing is
idempotent: a file whose entry has the same source, revision and converter
version and whose bytes still hash to the recorded SHA-256 is kept without
touching the network. Files and manifest are written through a temp file and a
rename, so an interrupted run leaves the previous state, never half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freelm.benchmarks.fetch import Fetched, fetch, sha256_file
from freelm.benchmarks.sources import Benchmark, BenchmarkDataError, RowRef
from freelm.jsonl import iter_jsonl, write_jsonl
from freelm.manifest import now_iso

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class PrepareResult:
    name: str
    path: Path
    rows: int
    sha256: str
    kept: bool


# --------------------------------------------------------------------------- manifest


def read_manifest(out: Path) -> dict[str, Any]:
    """``out``'s manifest, or an empty one when there is none yet; a corrupt one is an error (never overwritten)."""
    path = out / MANIFEST_NAME
    if not path.exists():
        return {"manifest_version": MANIFEST_VERSION, "files": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc}); move it away to start over") from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise ValueError(f"{path}: not a benchmark manifest (no 'files' object)")
    return data


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = out / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _up_to_date(entry: dict[str, Any] | None, bench: Benchmark, revision: str, path: Path) -> bool:
    return (
        entry is not None
        and path.is_file()
        and entry.get("source") == bench.source.label
        and entry.get("revision") == revision
        and entry.get("converter_version") == bench.version
        and sha256_file(path) == entry.get("sha256")
    )


# --------------------------------------------------------------------------- reading and converting


def read_rows(path: Path, bench: Benchmark, rel: str) -> list[dict[str, Any]]:
    """The rows of one upstream file (Parquet, JSONL or CSV, by extension)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise BenchmarkDataError(f"{bench.name}: reading {rel} needs pyarrow: pip install 'freelm[hub]'") from exc
        columns = list(bench.source.columns) if bench.source.columns else None
        try:
            return pq.read_table(path, columns=columns).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file or a missing column
            raise BenchmarkDataError(f"{bench.name}: {rel}: cannot read Parquet ({exc})") from exc
    if suffix == ".jsonl":
        try:
            return [row for _, row in iter_jsonl(path, tolerate_torn_tail=False)]
        except ValueError as exc:
            raise BenchmarkDataError(f"{bench.name}: {exc}") from exc
    if suffix == ".csv":
        text = path.read_text(encoding="utf-8")
        for broken, fixed in bench.source.repairs:
            if text.count(broken) != 1:
                raise BenchmarkDataError(
                    f"{bench.name}: {rel}: the known defect {broken[:40]!r}... occurs {text.count(broken)} times, "
                    "not once: the file is not the pinned one"
                )
            text = text.replace(broken, fixed)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
        for index, row in enumerate(rows, start=1):
            if None in row or None in row.values():
                raise BenchmarkDataError(
                    f"{RowRef(bench.name, rel, index)}: {len(reader.fieldnames or [])} columns expected "
                    "(an unbalanced quote or a stray comma)"
                )
        return rows
    raise BenchmarkDataError(f"{bench.name}: {rel}: unsupported file type {suffix!r}")


def convert(bench: Benchmark, fetched: Fetched) -> list[dict[str, Any]]:
    """All converted rows of ``fetched``, ordered, ids checked unique per source."""
    converted: list[tuple[dict[str, Any], RowRef]] = []
    for rel in fetched.files:
        for index, raw in enumerate(read_rows(fetched.root / rel, bench, rel), start=1):
            ref = RowRef(bench.name, rel, index)
            out = bench.convert(raw, ref)
            if out is None:  # not in the subset (HLE: images, multiple choice)
                continue
            row = {"id": str(out.pop("id")), "source": out.pop("source", bench.name)}
            row["prompt"] = out.pop("prompt")
            row["answer"] = out.pop("answer")
            converted.append(({**row, **out}, ref))
    if bench.sort_key is not None:
        converted.sort(key=lambda item: bench.sort_key(item[0]))
    first: dict[tuple[str, str], RowRef] = {}
    for row, ref in converted:
        key = (row["source"], row["id"])
        if key in first:
            raise BenchmarkDataError(
                f"{ref}: duplicate id {row['id']!r} (source {row['source']!r}), first at {first[key]}"
            )
        first[key] = ref
    if not converted:
        raise BenchmarkDataError(f"{bench.name}: no rows in {', '.join(fetched.files)}")
    return [row for row, _ in converted]


# --------------------------------------------------------------------------- prepare and verify


def prepare_benchmark(
    bench: Benchmark,
    out: Path,
    workdir: Path,
    revision: str | None = None,
    local_dir: str | Path | None = None,
    force: bool = False,
) -> PrepareResult:
    """Write ``out/<name>.jsonl`` from the upstream revision (kept when already up to date) and record it."""
    revision = revision or bench.source.revision
    file_name = f"{bench.name}.jsonl"
    path = out / file_name
    entry = read_manifest(out)["files"].get(file_name)
    if not force and _up_to_date(entry, bench, revision, path):
        return PrepareResult(bench.name, path, int(entry["rows"]), entry["sha256"], kept=True)
    fetched = fetch(bench, revision, workdir, local_dir)
    rows = convert(bench, fetched)
    if bench.rows is not None and revision == bench.source.revision and len(rows) != bench.rows:
        raise BenchmarkDataError(
            f"{bench.name}: {len(rows)} rows from {fetched.origin}, but the pinned revision has {bench.rows}"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    digest = sha256_file(path)
    manifest = read_manifest(out)
    manifest["manifest_version"] = MANIFEST_VERSION
    manifest["files"][file_name] = {
        "benchmark": bench.name,
        "title": bench.title,
        "source": bench.source.label,
        "url": bench.source.url(),
        "revision": revision,
        "commit": fetched.commit,
        "origin": fetched.origin,
        "upstream_files": {rel: sha256_file(fetched.root / rel) for rel in fetched.files},
        "rows": len(rows),
        "sha256": digest,
        "converter_version": bench.version,
        "prepared_at": now_iso(),
    }
    write_manifest(out, manifest)
    return PrepareResult(bench.name, path, len(rows), digest, kept=False)


def verify(out: Path, names: list[str] | None = None) -> list[tuple[str, str | None]]:
    """``(file, problem or None)`` for each manifest entry (only ``names``' when given), re-hashing every file."""
    files = read_manifest(out)["files"]
    wanted = [f"{name}.jsonl" for name in names] if names else sorted(files)
    report: list[tuple[str, str | None]] = []
    for file_name in wanted:
        entry = files.get(file_name)
        path = out / file_name
        if entry is None:
            problem = f"not in {out / MANIFEST_NAME}: run `freelm data prepare {file_name[:-6]}`"
        elif not path.is_file():
            problem = "missing"
        elif (actual := sha256_file(path)) != entry.get("sha256"):
            problem = f"SHA-256 {actual} differs from the manifest's {entry.get('sha256')}"
        else:
            problem = None
        report.append((file_name, problem))
    return report
