"""The paper's table layout in Markdown.

Rows are runs; each benchmark gets a p@1 and a #Token column; the Average
columns are means over benchmarks, with brackets against the baseline row:
absolute change in p@1 points, relative change in #Token.
"""

from __future__ import annotations

from freelm.evaluation.metrics import TOKEN_METRICS, RunMetrics


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _tokens(x: float | None) -> str:
    if x is None:
        return "n/a"  # the rows carry no token counts
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def paper_table(runs: list[RunMetrics], baseline: RunMetrics | None = None, token_metric: str = "generated") -> str:
    """Markdown table; ``baseline`` (if given) is the first row and the reference of the brackets."""
    key = TOKEN_METRICS[token_metric]
    rows = ([baseline] if baseline is not None else []) + [r for r in runs if r is not baseline]
    benchmarks = list(rows[0].benchmarks)
    for run in rows[1:]:
        if list(run.benchmarks) != benchmarks:
            raise ValueError(f"run {run.name!r} has benchmarks {list(run.benchmarks)}, expected {benchmarks}")
    header = ["Run"] + [f"{b} {col}" for b in benchmarks for col in ("p@1", "#Token")] + ["Avg p@1", "Avg #Token"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for run in rows:
        cells = [run.name]
        for b in benchmarks:
            m = run.benchmarks[b]
            cells += [_pct(m.avg_at_n), _tokens(getattr(m, key))]
        acc, tok = run.average["avg_at_n"], run.average[key]
        acc_cell, tok_cell = _pct(acc), _tokens(tok)
        if baseline is not None and run is not baseline:
            base_acc, base_tok = baseline.average["avg_at_n"], baseline.average[key]
            acc_cell += f" ({100 * (acc - base_acc):+.1f})"
            if base_tok and tok is not None:
                tok_cell += f" ({100 * (tok / base_tok - 1):+.1f}%)"
        cells += [acc_cell, tok_cell]
        lines.append("| " + " | ".join(cells) + " |")
    n = sorted({m.n_min for r in rows for m in r.benchmarks.values()})
    token_name = "all generated tokens" if token_metric == "generated" else "tokens kept after pruning"
    lines.append("")
    lines.append(
        f"p@1: pass@1 (%) averaged over n={'/'.join(map(str, n))} rollouts per problem; "
        f"#Token: mean {token_name} per rollout; Average: mean over benchmarks"
        + (f"; brackets vs {baseline.name!r}: absolute p@1 change, relative #Token change." if baseline else ".")
    )
    return "\n".join(lines) + "\n"
