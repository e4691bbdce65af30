"""``freelm judge`` / ``llm_judge.py``: LLM verdicts on extracted answers, cached in judge.jsonl."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import Counter
from pathlib import Path

SELECT = ("all", "rule-incorrect", "rule-undecided")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="[NAME=]PATH", help="runner output JSONL(s)")
    parser.add_argument("--output", type=Path, default=Path("judge.jsonl"), help="verdicts; also the resume cache")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    parser.add_argument("--model", required=True, help="judge model name")
    parser.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (never stored)"
    )
    parser.add_argument("--template", type=Path, help="judge prompt template (default: freelm/templates/judge.txt)")
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="JSONL",
        help="benchmark files giving problem text (else record prompt)",
    )
    parser.add_argument(
        "--select",
        choices=SELECT,
        default="all",
        help="answers to judge: all, those the rule grader rejects, or those it could not decide",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-retries", type=int, default=6, help="HTTP retries with backoff on 429/5xx/connection")
    parser.add_argument("--parse-retries", type=int, default=2, help="re-asks when the verdict is unparseable")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="total seconds per judge call: the whole reply, and the client's retries, must arrive within it "
        "(else the answer is recorded as 'error' and asked again by the next run)",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2, help="grading processes (for --select rule-*)")
    parser.add_argument("--no-progress", action="store_true")


def _items(args: argparse.Namespace):
    """Distinct (problem, ground truth, extracted answer) triples of the selected rollouts."""
    from freelm.data import load_problems
    from freelm.evaluation.extract import extract_answer
    from freelm.evaluation.grade import GraderPool, grade_pairs
    from freelm.evaluation.judge import JudgeItem
    from freelm.evaluation.runs import load_runs

    runs, _ = load_runs(args.input)
    problems = {p.key: p.prompt for path in args.data for p in load_problems(path)}
    candidates = []
    for run in runs:
        for r in run.records:
            answer = extract_answer(r.response).answer
            if answer is not None and r.answer is not None:
                candidates.append((r, answer))
    if args.select != "all":
        with GraderPool(args.workers) as pool:
            grades = grade_pairs([(r.answer, a) for r, a in candidates], pool)
        keep = (lambda g: not g.correct) if args.select == "rule-incorrect" else (lambda g: not g.decided)
        candidates = [(r, a) for r, a in candidates if keep(grades[(r.answer, a)])]
    items, no_text = {}, set()
    for r, answer in candidates:
        text = problems.get((r.source, r.id)) or r.prompt
        if not text:
            no_text.add((r.source, r.id))
            continue
        item = JudgeItem(r.source, r.id, text, r.answer, answer)
        items[item.key] = item
    if no_text:
        source, pid = sorted(no_text)[0]
        raise ValueError(
            f"no problem text for {len(no_text)} problem(s), e.g. source={source!r} id={pid!r}: "
            "pass the benchmark files with --data"
        )
    return list(items.values())


def run(args: argparse.Namespace) -> int:
    from openai import AsyncOpenAI

    from freelm.evaluation.judge import JudgeSettings, judge_items, load_judge_template
    from freelm.evaluation.outputs import refuse_aliases, run_input_files
    from freelm.http_limits import bounded_httpx_client
    from freelm.output_guard import write_failure

    try:
        refuse_aliases(
            {"--output": args.output},
            {
                "--input": run_input_files(args.input),
                "--data": [Path(d) for d in args.data],
                "--template": [args.template] if args.template else [],
            },
        )
        template = load_judge_template(args.template)
        items = _items(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    key = os.environ.get(args.api_key_env)
    if not key:
        print(f"note: ${args.api_key_env} is not set; sending a placeholder key", file=sys.stderr)
    settings = JudgeSettings(
        model=args.model,
        template=template,
        concurrency=args.concurrency,
        parse_retries=args.parse_retries,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        request_timeout=args.request_timeout,
    )

    async def main():
        client = AsyncOpenAI(
            base_url=args.base_url,
            api_key=key or "EMPTY",
            max_retries=args.max_retries,
            timeout=args.request_timeout,
            http_client=bounded_httpx_client(args.request_timeout),  # a reply's bytes are capped, not only its time
        )
        async with client:
            return await judge_items(items, client, settings, args.output, progress=not args.no_progress)

    try:
        judgments = asyncio.run(main())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the cache could not be written: what was appended before is intact
        print(
            f"error: {write_failure(args.output, exc)}; every verdict written before is kept: "
            "free space or fix the file, then re-run the same command",
            file=sys.stderr,
        )
        return 1
    counts = Counter(j.verdict for j in judgments.values())
    print(f"{len(judgments)} distinct answers judged -> {args.output}: {dict(counts)}", file=sys.stderr)
    errors = [j for j in judgments.values() if j.verdict == "error"]
    if errors:
        print(
            f"{len(errors)} answer(s) without a verdict (e.g. {errors[0].source} {errors[0].id}: {errors[0].error}); "
            "every verdict obtained is kept: re-run the same command to ask only those again",
            file=sys.stderr,
        )
    return 1 if errors else 0
