"""PNG plots of a comparison: accuracy vs tokens per benchmark, and the peak-context distribution."""

from __future__ import annotations

from pathlib import Path

from freelm.evaluation.metrics import TOKEN_METRICS, RunMetrics
from freelm.records import RolloutRecord

#: The files ``--plots-dir`` receives.
PLOT_FILES = ("accuracy_vs_tokens.png", "peak_context.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers or in tests
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_tokens(runs: list[RunMetrics], path: str | Path, token_metric: str = "generated") -> Path:
    """One panel per benchmark (plus the average): each run is a point at (mean #Token, p@1)."""
    plt = _pyplot()
    key = TOKEN_METRICS[token_metric]
    panels = list(runs[0].benchmarks) + ["Average"]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for run in runs:
            if panel == "Average":
                x, y = run.average[key], run.average["avg_at_n"]
            else:
                x, y = getattr(run.benchmarks[panel], key), run.benchmarks[panel].avg_at_n
            ax.scatter([x], [100 * y], label=run.name, s=40)
        ax.set_title(panel)
        ax.set_xlabel(f"mean {token_metric} tokens")
        ax.set_ylabel("p@1 (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, Path(path))


def plot_peak_context(runs: dict[str, list[RolloutRecord]], path: str | Path, bins: int = 40) -> Path:
    """Overlaid histograms of per-rollout peak context tokens (what KV memory must hold), one per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    values = {name: [r.peak_context_tokens for r in recs] for name, recs in runs.items()}
    top = max((max(v) for v in values.values() if v), default=1)
    edges = [top * i / bins for i in range(bins + 1)]
    for name, peaks in values.items():
        ax.hist(peaks, bins=edges, histtype="step", linewidth=1.8, label=f"{name} (n={len(peaks)})")
    ax.set_xlabel("peak context tokens per rollout")
    ax.set_ylabel("rollouts")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, Path(path))


def _save(plt, fig, path: Path) -> Path:
    """Written whole or not at all (:func:`~freelm.evaluation.outputs.output_file`)."""
    from freelm.evaluation.outputs import output_file

    try:
        with output_file(path, binary=True) as f:
            fig.savefig(f, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
