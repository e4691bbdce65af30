"""``freelm view``: one rollout as a self-contained HTML page.

The page shows every character the reasoner ever generated, in order, with the
text that a cleaning round deleted struck through in place (hover: which round
deleted it), round boundaries marked, per-round statistics, and an inline SVG
chart of context length over generated tokens (several runs overlaid, e.g.
vanilla vs Free()LM). No scripts, fonts or images are fetched: the file opens
offline.

The history is rebuilt with :meth:`freelm.records.RolloutRecord.replay` semantics
from the rounds alone, so any runner output can be viewed.
"""

from __future__ import annotations

import argparse
import html
from dataclasses import dataclass
from pathlib import Path

from freelm.records import RolloutRecord
from freelm.shards import read_run, run_files

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


@dataclass
class Piece:
    """A run of generated characters sharing the round that wrote them and the round that deleted them."""

    text: str
    written_in: int
    deleted_in: int | None


def trace_pieces(record: RolloutRecord) -> list[Piece]:
    """Every generated character of the rollout, tagged with when it was written and deleted."""
    stream: list[str] = []
    written: list[int] = []
    deleted: list[int | None] = []
    current: list[int] = []  # global index of each character of the current response
    for rnd in record.rounds:
        for index in current[len(current) - rnd.rewound_chars :] if rnd.rewound_chars else []:
            deleted[index] = rnd.index  # re-decoded characters (a split multi-byte char)
        if rnd.rewound_chars:
            del current[len(current) - rnd.rewound_chars :]
        start = len(stream)
        stream.extend(rnd.generated_text)
        written.extend([rnd.index] * len(rnd.generated_text))
        deleted.extend([None] * len(rnd.generated_text))
        current.extend(range(start, len(stream)))
        if rnd.clean is not None and rnd.clean.deleted_spans:
            gone = set()
            for s, e in rnd.clean.deleted_spans:
                for index in current[s:e]:
                    deleted[index] = rnd.index
                gone.update(range(s, e))
            current = [g for i, g in enumerate(current) if i not in gone]
    pieces: list[Piece] = []
    for char, w, d in zip(stream, written, deleted):
        if pieces and pieces[-1].written_in == w and pieces[-1].deleted_in == d:
            pieces[-1].text += char
        else:
            pieces.append(Piece(char, w, d))
    return pieces


def context_curve(record: RolloutRecord) -> list[tuple[int, int]]:
    """(generated tokens so far, context tokens) points: a sawtooth when cleaning deletes."""
    points = [(0, record.rounds[0].prompt_tokens if record.rounds else record.prompt_tokens)]
    generated = 0
    for rnd in record.rounds:
        generated += rnd.generated_tokens
        points.append((generated, rnd.context_tokens))
        if rnd.clean is not None and rnd.clean.context_tokens_after != rnd.clean.context_tokens_before:
            points.append((generated, rnd.clean.context_tokens_after))
    return points


def _svg_chart(curves: list[tuple[str, list[tuple[int, int]]]], width: int = 640, height: int = 240) -> str:
    pad = 48
    max_x = max((x for _, pts in curves for x, _ in pts), default=1) or 1
    max_y = max((y for _, pts in curves for _, y in pts), default=1) or 1

    def sx(x: float) -> float:
        return pad + (width - 2 * pad) * x / max_x

    def sy(y: float) -> float:
        return height - pad + -(height - 2 * pad) * y / max_y

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="context length over generated tokens">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>',
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="12">generated tokens (max {max_x:,})</text>',
        f'<text x="14" y="{height / 2}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {height / 2})">'
        f"context tokens (max {max_y:,})</text>",
    ]
    for i, (label, pts) in enumerate(curves):
        color = _COLORS[i % len(_COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        parts.append(
            f'<text x="{width - pad + 4 - 120}" y="{pad + 14 * i}" font-size="12" fill="{color}">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
pre.trace{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px;line-height:1.45;background:#fafafa;padding:1em;border:1px solid #ddd}
del{color:#b00;background:#fdecec}
.r0{background:none}.r1{background:#f3f7ff}
.mark{color:#fff;background:#555;font-size:11px;padding:0 4px;border-radius:3px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
td.l,th.l{text-align:left}
"""


def render_html(record: RolloutRecord, others: list[tuple[str, RolloutRecord]] = ()) -> str:
    """The page for ``record``; ``others`` are extra (label, record) curves for the chart."""
    esc = html.escape
    trace = []
    last_round = -1
    for piece in trace_pieces(record):
        if piece.written_in != last_round:
            trace.append(f'<span class="mark">round {piece.written_in}</span>')
            last_round = piece.written_in
        body = esc(piece.text)
        cls = f"r{piece.written_in % 2}"
        if piece.deleted_in is not None:
            trace.append(f'<del class="{cls}" title="deleted in round {piece.deleted_in}">{body}</del>')
        else:
            trace.append(f'<span class="{cls}">{body}</span>')
    rows = []
    for rnd in record.rounds:
        c = rnd.clean
        cells = [rnd.index, f"{rnd.generated_tokens:,}", f"{rnd.context_tokens:,}"]
        if c is None:
            cells += ["", "", "", "", "", f"{rnd.latency_s:.2f}", ""]
        else:
            skipped = "; ".join(f"{s['reason']}: {s['prefix'][:30]!r}" for s in c.skipped)
            problems = " ".join(x for x in [c.parse_error, c.error] if x)
            cells += [f"{c.context_tokens_after:,}", c.tokens_deleted, c.applied, esc(skipped), esc(problems),
                      f"{rnd.latency_s:.2f}", f"{c.latency_s:.2f}"]  # fmt: skip
        rows.append(
            "<tr>" + "".join(f"<td{' class=l' if i in (6, 7) else ''}>{v}</td>" for i, v in enumerate(cells)) + "</tr>"
        )
    label = f"{record.mode} (this rollout)"
    chart = _svg_chart([(label, context_curve(record))] + [(lab, context_curve(r)) for lab, r in others])
    summary = (
        f"finish: <b>{esc(record.finish_reason)}</b> · generated {record.generated_tokens:,} tokens · "
        f"final context {record.final_context_tokens:,} · peak context {record.peak_context_tokens:,} · "
        f"{record.cleaning_rounds} cleaning rounds · {record.wall_time_s:.1f} s"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>freelm trace {esc(record.id)} #{record.rollout}</title><style>{_CSS}</style></head>
<body>
<h1>Rollout {esc(record.id)} #{record.rollout} <small>({esc(record.mode)}, source {esc(record.source)})</small></h1>
<p>{summary}</p>
<p>ground truth: <code>{esc(str(record.answer))}</code></p>
<h2>Problem</h2><pre class="trace">{esc(record.prompt or "(prompt not stored in this output)")}</pre>
<h2>Context length</h2>{chart}
<h2>Rounds</h2>
<table><tr><th>round</th><th>generated</th><th>context</th><th>after clean</th><th>tokens deleted</th>
<th>applied</th><th class="l">skipped (reason: prefix)</th><th class="l">errors</th><th>reason s</th><th>clean s</th></tr>
{"".join(rows)}</table>
<h2>Trace</h2><p>Everything the reasoner wrote, in order; <del>struck-through</del> text was deleted by a cleaning round.</p>
<pre class="trace">{"".join(trace)}</pre>
</body></html>
"""


def find_record(path: str | Path, id: str, rollout: int, source: str | None = None) -> RolloutRecord:
    """The rollout ``(source, id, rollout)``; ``source`` may be left out while the id names one problem.

    Ids repeat across benchmarks (AIME25 and BeyondAIME both have id 1) and a
    concatenated run holds several, so an id alone must not pick one silently.
    A duplicated line counts as in evaluation: the last one written. ``path``
    may stand for a sharded run's shards, as in evaluation (:func:`freelm.shards.run_files`).
    """
    try:
        records = read_run(run_files(path))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    found = [r for r in records if r.id == id and r.rollout == rollout and source in (None, r.source)]
    sources = sorted({r.source for r in found})
    if len(sources) > 1:
        raise SystemExit(f"{path}: id {id!r} is in several sources ({', '.join(sources)}): choose one with --source")
    if not found:
        where = "" if source is None else f" in source {source!r}"
        raise SystemExit(f"{path}: no rollout with id {id!r} and rollout {rollout}{where}")
    return found[-1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="runner output JSONL (a sharded run: its un-sharded name, a glob or a,b,c)")
    parser.add_argument("--id", required=True, help="problem id")
    parser.add_argument("--source", help="the problem's source (benchmark); needed when the id is in several")
    parser.add_argument("--rollout", type=int, default=0, help="rollout index (default 0)")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="JSONL",
        help="another run's output (e.g. vanilla) whose same rollout is overlaid on the chart; repeatable",
    )
    parser.add_argument("-o", "--out", default="trace.html", help="HTML file to write (default trace.html)")


def run(args: argparse.Namespace) -> int:
    record = find_record(args.output, args.id, args.rollout, args.source)
    others = []
    for path in args.compare:
        other = find_record(path, args.id, args.rollout, record.source)
        others.append((f"{other.mode} ({Path(path).name})", other))
    Path(args.out).write_text(render_html(record, others), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0
