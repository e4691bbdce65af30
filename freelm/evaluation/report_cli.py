"""``freelm report``: the efficiency report (KV bytes per sample, tokens, latency overhead vs a baseline)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from freelm.evaluation.efficiency import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="[NAME=]PATH", help="runner output JSONL(s)")
    parser.add_argument("--baseline", metavar="NAME|[NAME=]PATH", help="reference run (usually vanilla)")
    parser.add_argument(
        "--model",
        required=True,
        help=f"KV shape: a preset ({', '.join(PRESETS)}) or a model directory / config.json",
    )
    parser.add_argument("--output", type=Path, default=Path("efficiency.json"))
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table here")


def run(args: argparse.Namespace) -> int:
    from freelm.evaluation.efficiency import efficiency_dict, efficiency_markdown, efficiency_rows, resolve_kv_spec
    from freelm.evaluation.outputs import OutputWriteFailed, refuse_aliases, run_input_files, write_output
    from freelm.evaluation.runs import load_runs

    try:
        model_files = [p for p in (Path(args.model), Path(args.model) / "config.json") if p.is_file()]
        refuse_aliases(
            {"--output": args.output, "--markdown": args.markdown},
            {
                "--input": run_input_files(args.input),
                "--baseline": run_input_files([args.baseline]),
                "--model": model_files,
            },
        )
        spec = resolve_kv_spec(args.model)
        runs, base = load_runs(args.input, args.baseline)
        rows = efficiency_rows({r.name: r.records for r in runs}, spec, base.name if base else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = efficiency_markdown(rows, spec)
    try:
        write_output(args.output, json.dumps(efficiency_dict(rows, spec), indent=2) + "\n")
        if args.markdown:
            write_output(args.markdown, table)
    except OutputWriteFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table, end="")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
