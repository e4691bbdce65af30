"""``freelm data prepare`` and ``freelm data list``: get every benchmark of the paper into ``data/benchmarks``."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from freelm.benchmarks.fetch import FetchError
from freelm.benchmarks.prepare import MANIFEST_NAME, prepare_benchmark, read_manifest, verify
from freelm.benchmarks.sources import BENCHMARKS, Benchmark, BenchmarkDataError

DEFAULT_OUT = "data/benchmarks"


@dataclass(frozen=True)
class Subcommand:
    """What ``freelm.cli`` needs of a subcommand: its arguments and its entry point."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _revision_line(bench: Benchmark) -> str:
    source = bench.source
    return f"{source.label} @ {source.revision}" + ("" if source.pinned else " (unpinned)")


def _catalogue() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["benchmarks (name, source @ revision, rows):"]
    for bench in BENCHMARKS.values():
        rows = "?" if bench.rows is None else str(bench.rows)
        gated = ", gated" if bench.source.gated else ""
        lines.append(f"  {bench.name:<{width}}  {_revision_line(bench)}  {rows} rows{gated}")
    lines.append("`freelm data list` shows each one's normalisation, license and notes.")
    return "\n".join(lines)


def _pairs(values: list[str] | None, option: str, names: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` options (a bare VALUE is allowed with exactly one NAME)."""
    pairs: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep:
            if len(names) != 1:
                raise ValueError(f"{option} {value}: write {option} NAME={value} when preparing several benchmarks")
            name, rest = names[0], value
        if name not in BENCHMARKS:
            raise ValueError(f"{option} {value}: unknown benchmark {name!r}")
        pairs[name] = rest
    return pairs


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _catalogue()
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to prepare (see below)")
    parser.add_argument("--all", action="store_true", help="prepare every benchmark listed below")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument(
        "--revision", action="append", metavar="[NAME=]REV", help="use this upstream revision instead of the pinned one"
    )
    parser.add_argument(
        "--from",
        dest="local",
        action="append",
        metavar="NAME=DIR",
        help="read NAME's upstream files from a local copy of its repository instead of downloading",
    )
    parser.add_argument("--force", action="store_true", help="rewrite files even when they are up to date")
    parser.add_argument(
        "--verify",
        action="store_true",
        help=f"download nothing: re-hash the prepared files (all, or the NAMEs) against {MANIFEST_NAME}",
    )


def run_prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        if args.verify:
            return _run_verify(out, args.names)
        names = list(BENCHMARKS) if args.all else args.names
        if not names:
            print("error: name at least one benchmark, or --all (freelm data list)", file=sys.stderr)
            return 2
        revisions = _pairs(args.revision, "--revision", names)
        local = _pairs(args.local, "--from", names)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="freelm-data-") as work:
        for name in names:
            try:
                result = prepare_benchmark(
                    BENCHMARKS[name], out, Path(work), revisions.get(name), local.get(name), force=args.force
                )
            except FetchError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed.append(name)
                if exc.network:
                    rest = names[names.index(name) + 1 :]
                    if rest:
                        print(f"not tried (same network problem): {', '.join(rest)}", file=sys.stderr)
                    break
                continue
            except (BenchmarkDataError, ValueError, OSError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed.append(name)
                continue
            action = "kept (up to date)" if result.kept else "wrote"
            print(f"{name}: {action} {result.path} ({result.rows} rows, sha256 {result.sha256[:16]})")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_verify(out: Path, names: list[str]) -> int:
    report = verify(out, names or None)
    if not report:
        print(f"nothing to verify: {out / MANIFEST_NAME} lists no files", file=sys.stderr)
        return 1
    for file_name, problem in report:
        print(f"{file_name}: {'ok' if problem is None else problem}")
    return 1 if any(problem for _, problem in report) else 0


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"folder whose prepared files to show (default: {DEFAULT_OUT})"
    )


def run_list(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        prepared = read_manifest(out)["files"]
    except ValueError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        prepared = {}
    for bench in BENCHMARKS.values():
        entry = prepared.get(f"{bench.name}.jsonl")
        status = f"prepared in {out} ({entry['rows']} rows)" if entry else "not prepared"
        print(f"{bench.name}: {bench.title} [{status}]")
        print(f"    source:  {_revision_line(bench)}  {bench.source.url()}")
        rows = "not confirmed" if bench.rows is None else str(bench.rows)
        print(f"    rows:    {rows}; license: {bench.license}")
        print(f"    fields:  {bench.normalisation}")
        if bench.source.note:
            print(f"    note:    {bench.source.note}")
    return 0


prepare = Subcommand(add_prepare_arguments, run_prepare)
listing = Subcommand(add_list_arguments, run_list)
