"""Runner output -> graded rollouts -> per-benchmark and overall metrics (the content of metrics.json)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

from freelm.evaluation.extract import extract_answer
from freelm.evaluation.grade import BOUNDED_METHODS, Grade, GraderPool, grade_pairs, normalize_answer
from freelm.evaluation.passk import k_values, maj_at_k, mean_and_se, pass_at_k
from freelm.records import RolloutRecord

Combine = Literal["rule", "judge", "either", "both", "fallback"]
COMBINE_MODES: tuple[str, ...] = ("rule", "judge", "either", "both", "fallback")

#: (source, id, ground truth, extracted answer): the identity of one judged answer.
JudgeKey = tuple[str, str, str, str]


@dataclass
class GradedRollout:
    record: RolloutRecord
    extracted: str | None
    unanswered_reason: str | None
    rule: Grade
    judge: bool | None  # None: not judged (or not needed)
    correct: bool

    @property
    def problem(self) -> tuple[str, str]:
        return (self.record.source, self.record.id)


@dataclass
class BenchmarkMetrics:
    """Metrics of one benchmark (or of all problems pooled); field names are the metrics.json keys."""

    problems: int
    rollouts: int
    n_min: int
    n_max: int
    avg_at_n: float  # mean over rollouts of accuracy = the paper's "pass@1 over n rollouts"
    avg_at_n_se: float  # standard error across rollout indices (one accuracy per rollout index)
    pass_at_k: dict[int, float]
    maj_at_k: dict[int, float]
    unanswered: int
    unanswered_reasons: dict[str, int]
    # None: the input rows have no such column (other tools' outputs, see freelm.evaluation.external)
    mean_generated_tokens: float | None
    mean_final_context_tokens: float | None
    mean_kept_response_tokens: float | None  # final context minus prompt: the response left after pruning
    mean_peak_context_tokens: float | None
    mean_cleaning_rounds: float | None
    mean_wall_time_s: float | None
    finish_reasons: dict[str, int]
    grade_methods: dict[str, int]
    rule_undecided: int
    over_bounds: int  # answers a grading bound stopped (too long, past the deadline): graded incorrect
    judge_overrides: int  # rollouts whose final grade differs from the rule grade


@dataclass
class RunMetrics:
    name: str
    path: str
    modes: list[str]
    config_hashes: list[str]
    combine: str
    duplicate_records: int
    benchmarks: dict[str, BenchmarkMetrics]
    overall: BenchmarkMetrics  # all problems pooled
    average: dict[str, float | None] = field(default_factory=dict)  # mean over benchmarks (the paper's "Average")

    def to_dict(self) -> dict:
        return asdict(self)


def dedupe_records(records: Iterable[RolloutRecord]) -> tuple[list[RolloutRecord], int]:
    """One record per (source, id, rollout), the last one written wins; returns the number dropped."""
    by_key: dict[tuple[str, str, int], RolloutRecord] = {}
    total = 0
    for record in records:
        by_key[(record.source, record.id, record.rollout)] = record
        total += 1
    return list(by_key.values()), total - len(by_key)


def combine_grades(rule: Grade, verdict: bool | None, mode: Combine) -> bool:
    """Final correctness from the rule grade and a judge verdict (None = no verdict needed/available)."""
    if mode == "rule":
        return rule.correct
    if mode == "fallback":  # trust the rule where it reached a verdict; the judge settles the rest
        return rule.correct if rule.decided else bool(verdict)
    if mode == "judge":
        return bool(verdict)
    if mode == "either":
        return rule.correct or bool(verdict)
    if mode == "both":
        return rule.correct and bool(verdict)
    raise ValueError(f"unknown combine mode {mode!r}; choose from {', '.join(COMBINE_MODES)}")


def needs_verdict(rule: Grade, mode: Combine) -> bool:
    """Whether ``mode`` needs the judge for this answer (so a missing verdict is an error)."""
    return {
        "rule": False,
        "fallback": not rule.decided,
        "judge": True,
        "either": not rule.correct,
        "both": rule.correct,
    }[mode]


def grade_records(
    records: list[RolloutRecord],
    pool: GraderPool,
    *,
    judgments: Mapping[JudgeKey, bool | None] | None = None,
    combine: Combine = "rule",
    progress: Callable | None = None,
) -> list[GradedRollout]:
    """Extract, grade (deduplicated), then combine with judge verdicts as ``combine`` says.

    Unanswered rollouts are wrong whatever the mode: there is nothing to judge.
    """
    no_gold = [r for r in records if r.answer is None]
    if no_gold:
        r = no_gold[0]
        raise ValueError(f"{len(no_gold)} record(s) have no ground-truth answer, e.g. source={r.source!r} id={r.id!r}")
    extractions = [extract_answer(r.response) for r in records]
    pairs = [(r.answer, e.answer) for r, e in zip(records, extractions)]
    grades = grade_pairs(pairs, pool, progress=progress)
    graded: list[GradedRollout] = []
    missing: list[JudgeKey] = []
    for record, extraction, pair in zip(records, extractions, pairs):
        rule = grades[pair]
        verdict = None
        if extraction.answer is None:
            correct = False
        else:
            key = (record.source, record.id, record.answer, extraction.answer)
            if combine != "rule" and judgments is not None:
                verdict = judgments.get(key)
            if combine != "rule" and verdict is None and needs_verdict(rule, combine):
                missing.append(key)
            correct = combine_grades(rule, verdict, combine)
        graded.append(GradedRollout(record, extraction.answer, extraction.reason, rule, verdict, correct))
    if missing:
        raise ValueError(
            f"combine={combine!r} needs a judge verdict for {len(missing)} answer(s) not in the judgments file, "
            f"e.g. source={missing[0][0]!r} id={missing[0][1]!r} answer={missing[0][3]!r}; "
            "run llm_judge.py on the same inputs first"
        )
    return graded


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _mean_present(values: list[float | None]) -> float | None:
    """A column other tools' rows may lack (see freelm.evaluation.external): None when absent, never zero."""
    return None if any(v is None for v in values) else _mean(values)  # type: ignore[arg-type]


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summarize(graded: list[GradedRollout]) -> BenchmarkMetrics:
    if not graded:
        raise ValueError("no rollouts to summarize")
    by_problem: dict[tuple[str, str], list[GradedRollout]] = defaultdict(list)
    for g in graded:
        by_problem[g.problem].append(g)
    ns = [len(v) for v in by_problem.values()]
    n_min = min(ns)
    ks = k_values(n_min)
    pass_k = {k: _mean([pass_at_k(len(v), sum(g.correct for g in v), k) for v in by_problem.values()]) for k in ks}
    maj_k = {
        k: _mean(
            [
                maj_at_k([(None if g.extracted is None else normalize_answer(g.extracted), g.correct) for g in v], k)
                for v in by_problem.values()
            ]
        )
        for k in ks
    }
    by_index: dict[int, list[bool]] = defaultdict(list)
    for g in graded:
        by_index[g.record.rollout].append(g.correct)
    per_index_acc = [_mean([float(c) for c in v]) for _, v in sorted(by_index.items())]
    _, se = mean_and_se(per_index_acc)
    recs = [g.record for g in graded]
    return BenchmarkMetrics(
        problems=len(by_problem),
        rollouts=len(graded),
        n_min=n_min,
        n_max=max(ns),
        avg_at_n=_mean([_mean([float(g.correct) for g in v]) for v in by_problem.values()]),
        avg_at_n_se=se,
        pass_at_k=pass_k,
        maj_at_k=maj_k,
        unanswered=sum(g.extracted is None for g in graded),
        unanswered_reasons=dict(Counter(g.unanswered_reason for g in graded if g.unanswered_reason)),
        mean_generated_tokens=_mean_present([r.generated_tokens for r in recs]),
        mean_final_context_tokens=_mean_present([r.final_context_tokens for r in recs]),
        mean_kept_response_tokens=_mean_present([_difference(r.final_context_tokens, r.prompt_tokens) for r in recs]),
        mean_peak_context_tokens=_mean_present([r.peak_context_tokens for r in recs]),
        mean_cleaning_rounds=_mean_present([r.cleaning_rounds for r in recs]),
        mean_wall_time_s=_mean_present([r.wall_time_s for r in recs]),
        finish_reasons=dict(Counter(r.finish_reason for r in recs)),
        grade_methods=dict(Counter(g.rule.method for g in graded)),
        rule_undecided=sum(not g.rule.decided for g in graded),
        over_bounds=sum(g.rule.method in BOUNDED_METHODS for g in graded),
        judge_overrides=sum(g.correct != g.rule.correct for g in graded),
    )


#: Table columns: the metric behind "#Token" (see docs/evaluation.md for why generated is the default).
TOKEN_METRICS = {"generated": "mean_generated_tokens", "kept": "mean_kept_response_tokens"}


def run_metrics(
    name: str,
    path: str,
    graded: list[GradedRollout],
    *,
    combine: str,
    duplicates: int,
    benchmarks: list[str] | None = None,
) -> RunMetrics:
    """Metrics of one run; ``benchmarks`` restricts and orders the sources (default: order of appearance)."""
    by_source: dict[str, list[GradedRollout]] = defaultdict(list)
    for g in graded:
        by_source[g.record.source].append(g)
    order = benchmarks if benchmarks is not None else list(by_source)
    absent = [b for b in order if b not in by_source]
    if absent:
        raise ValueError(f"{path}: no rollouts for benchmark(s) {', '.join(absent)} (found: {', '.join(by_source)})")
    per_bench = {b: summarize(by_source[b]) for b in order}
    selected = [g for b in order for g in by_source[b]]
    average = {
        "avg_at_n": _mean([m.avg_at_n for m in per_bench.values()]),
        **{key: _mean_present([getattr(m, key) for m in per_bench.values()]) for key in TOKEN_METRICS.values()},
        "mean_peak_context_tokens": _mean_present([m.mean_peak_context_tokens for m in per_bench.values()]),
    }
    recs = [g.record for g in selected]
    return RunMetrics(
        name=name,
        path=path,
        modes=sorted({r.mode for r in recs}),
        config_hashes=sorted({r.config_hash for r in recs}),
        combine=combine,
        duplicate_records=duplicates,
        benchmarks=per_bench,
        overall=summarize(selected),
        average=average,
    )
