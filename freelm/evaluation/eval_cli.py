"""``freelm eval`` / ``eval_passk.py``: grade runner outputs and write metrics.json, the table and plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from freelm.evaluation.metrics import COMBINE_MODES, TOKEN_METRICS, grade_records, run_metrics
from freelm.evaluation.plots import PLOT_FILES, plot_accuracy_vs_tokens, plot_peak_context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="[NAME=]PATH",
        help="runner output JSONL(s), or other tools' rows with id, source and a response (docs/evaluation.md)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="problem files whose answers fill rows without one (matched by source and id)",
    )
    parser.add_argument("--source", metavar="NAME", help="benchmark name for rows without a 'source' field")
    parser.add_argument(
        "--baseline",
        metavar="NAME|[NAME=]PATH",
        help="reference run for the Average deltas (an --input name or a file)",
    )
    parser.add_argument("--output", type=Path, default=Path("metrics.json"), help="machine-readable metrics")
    parser.add_argument("--markdown", type=Path, help="write the paper-format table here (also printed)")
    parser.add_argument("--plots-dir", type=Path, help="write accuracy_vs_tokens.png and peak_context.png here")
    parser.add_argument(
        "--token-metric",
        choices=sorted(TOKEN_METRICS),
        default="generated",
        help="what #Token counts: every generated token (default: the compute actually spent) "
        "or the tokens kept after pruning",
    )
    parser.add_argument("--benchmarks", nargs="+", metavar="SOURCE", help="benchmark columns, in order (default: all)")
    parser.add_argument("--judgments", type=Path, help="judge.jsonl written by llm_judge.py")
    parser.add_argument(
        "--combine",
        choices=COMBINE_MODES,
        help="how judge verdicts combine with the rule grade: rule, judge, either, both, or fallback "
        "(judge only where the rule grader could not decide); default: judge if --judgments else rule",
    )
    parser.add_argument("--workers", type=int, default=2, help="grading processes")
    parser.add_argument(
        "--grade-timeout",
        type=float,
        default=5.0,
        help="CPU seconds math-verify may spend on one answer (CPU, not wall clock: a verdict must not depend on "
        "machine load); an answer over it is graded again with 4x the budget, then reported as 'timeout', never as "
        "wrong",
    )
    parser.add_argument(
        "--grade-retries", type=int, default=1, help="re-gradings with 4x the CPU budget before 'timeout'"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from freelm.data import load_problems
    from freelm.evaluation.grade import GraderPool
    from freelm.evaluation.judgments import read_judgments, verdicts_for_grading
    from freelm.evaluation.outputs import OutputWriteFailed, refuse_aliases, run_input_files, write_output
    from freelm.evaluation.runs import load_runs
    from freelm.evaluation.table import paper_table

    combine = args.combine or ("judge" if args.judgments else "rule")
    if combine != "rule" and not args.judgments:
        print(f"error: --combine {combine} needs --judgments", file=sys.stderr)
        return 2
    plots = {name: args.plots_dir / name for name in PLOT_FILES} if args.plots_dir else {}
    try:
        refuse_aliases(
            {
                "--output": args.output,
                "--markdown": args.markdown,
                **{f"--plots-dir ({n})": p for n, p in plots.items()},
            },
            {
                "--input": run_input_files(args.input),
                "--baseline": run_input_files([args.baseline]),
                "--data": [Path(d) for d in args.data],
                "--judgments": [args.judgments] if args.judgments else [],
            },
        )
        answers = {p.key: p.answer for path in args.data for p in load_problems(path)}
        runs, base = load_runs(args.input, args.baseline, source=args.source, answers=answers)
        verdicts = verdicts_for_grading(read_judgments(args.judgments)) if args.judgments else None
        benchmarks = args.benchmarks or list(dict.fromkeys(r.source for r in runs[0].records))
        metrics = []
        with GraderPool(args.workers, timeout_s=args.grade_timeout, retries=args.grade_retries) as pool:
            for r in runs:
                bar = tqdm(desc=f"grading {r.name}", unit="answer", disable=args.no_progress)
                graded = grade_records(r.records, pool, judgments=verdicts, combine=combine, progress=bar)
                bar.close()
                graded = [g for g in graded if g.record.source in benchmarks]
                metrics.append(
                    run_metrics(
                        r.name, str(r.path), graded, combine=combine, duplicates=r.duplicates, benchmarks=benchmarks
                    )
                )
            restarts, retried = pool.restarts, pool.retried
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base_metrics = metrics[runs.index(base)] if base is not None else None
    table = paper_table(metrics, base_metrics, args.token_metric)
    payload = {
        "token_metric": args.token_metric,
        "combine": combine,
        "baseline": base.name if base else None,
        "grading": {
            "workers": args.workers,
            "timeout_s": args.grade_timeout,
            "timeout_clock": "cpu",
            "retries": args.grade_retries,
            "retried": retried,
            "worker_restarts": restarts,
        },
        "runs": [m.to_dict() for m in metrics],
    }
    try:
        write_output(args.output, json.dumps(payload, indent=2) + "\n")
        if args.markdown:
            write_output(args.markdown, table)
        if plots:
            key = TOKEN_METRICS[args.token_metric]  # runs whose rows carry no token counts have no point to plot
            plotted = [m for m in metrics if all(getattr(b, key) is not None for b in m.benchmarks.values())]
            peaks = {r.name: r.records for r, m in zip(runs, metrics) if m.overall.mean_peak_context_tokens is not None}
            plot_accuracy_vs_tokens(plotted, plots["accuracy_vs_tokens.png"], args.token_metric)
            plot_peak_context(peaks, plots["peak_context.png"])
    except OutputWriteFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table, end="")
    for m in metrics:
        o = m.overall
        print(
            f"{m.name}: {o.problems} problems x n={o.n_min}..{o.n_max}; unanswered {o.unanswered}/{o.rollouts}; "
            f"rule undecided {o.rule_undecided}; over grading bounds {o.over_bounds} "
            f"(timeouts {o.grade_methods.get('timeout', 0)}); finish {o.finish_reasons}",
            file=sys.stderr,
        )
    return 0
