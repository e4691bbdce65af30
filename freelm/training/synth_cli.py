"""``freelm synth``: reward-filtered synthesis from the command line.

Reads vanilla runner outputs and their problem file, cuts them where the loop
would clean, asks an OpenAI-compatible teacher and keeps what the reward filter
accepts (:mod:`freelm.training.synth`). The reasoner of the reward filter is a
backend of the registry (:func:`freelm.backends.make_backend`): an SGLang server
or the model in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
from pathlib import Path
from typing import Any

from freelm.backends.base import Backend, SamplingParams
from freelm.loop import LoopConfig
from freelm.tokenizer import Tokenizer
from freelm.training.cuts import collect_cuts
from freelm.training.reward import AnswerGrader, RewardFilter
from freelm.training.synth import Synthesizer
from freelm.training.teachers import OpenAITeacher

#: OpenAITeacher's keyword options and their flags; types and defaults are the constructor's own.
_TEACHER_FLAGS = {
    "max_tokens": "--teacher-max-tokens",
    "temperature": "--teacher-temperature",
    "timeout": "--teacher-timeout",
    "max_retries": "--teacher-retries",
}


def _teacher_options() -> dict[str, tuple[str, Any]]:
    """``option -> (flag, default)`` from :class:`OpenAITeacher`'s signature, so flag and constructor cannot disagree."""
    parameters = inspect.signature(OpenAITeacher.__init__).parameters
    return {name: (flag, parameters[name].default) for name, flag in _TEACHER_FLAGS.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--runs", nargs="+", required=True, help="vanilla runner output JSONL file(s)")
    io.add_argument("--problems", required=True, help="problem JSONL (id, source, prompt, answer)")
    io.add_argument("--output", required=True, type=Path, help="SFT JSONL to append accepted examples to")
    io.add_argument("--log", type=Path, help="every decided example (default: OUTPUT with .synth.jsonl)")
    io.add_argument("--tokenizer", required=True, help="the REASONER's tokenizer directory (cuts are in its tokens)")
    io.add_argument("--template", help="cleaning template (default: built-in)")
    io.add_argument(
        "--clean-every", type=int, default=LoopConfig.clean_every, help="cut every N thinking tokens, as at inference"
    )
    io.add_argument("--max-cuts-per-trajectory", type=int, help="use only the first N cuts of each trajectory")
    io.add_argument("--limit", type=int, help="process at most N cuts")
    io.add_argument("--keep-empty", type=float, default=0.1, help="share of teacher [] answers kept as examples")
    io.add_argument("--concurrency", type=int, default=8, help="examples decided at once")
    io.add_argument("--no-progress", action="store_true")

    teacher = parser.add_argument_group("teacher (OpenAI-compatible chat completions)")
    teacher.add_argument("--teacher-base-url", required=True, help="e.g. https://.../v1")
    teacher.add_argument("--teacher-model", required=True)
    teacher.add_argument("--teacher-api-key-env", default="OPENAI_API_KEY", help="env var holding the API key")
    for flag, default in _teacher_options().values():
        teacher.add_argument(flag, type=type(default), default=default)

    reward = parser.add_argument_group("reward filter (base-model continuations)")
    where = reward.add_mutually_exclusive_group(required=True)
    where.add_argument("--reasoner-url", help="SGLang server of the base model")
    where.add_argument("--reasoner-model-dir", help="run the base model in-process (transformers)")
    reward.add_argument("--k", type=int, default=4, help="continuations per context")
    reward.add_argument("--comparison", choices=("ge", "gt"), default="ge", help="pruned >= or > unpruned + margin")
    reward.add_argument("--margin", type=float, default=0.0)
    reward.add_argument("--max-tokens", type=int, default=8192, help="tokens per continuation")
    reward.add_argument("--context-limit", type=int, default=40960)
    reward.add_argument("--temperature", type=float, default=0.6)
    reward.add_argument("--top-p", type=float, default=0.95)
    reward.add_argument("--top-k", type=int, default=20)
    reward.add_argument("--seed", type=int, default=0)
    reward.add_argument("--grader-workers", type=int, default=2)


def _reasoner(args: argparse.Namespace) -> Backend:
    from freelm.backends import make_backend

    if args.reasoner_url:
        return make_backend("sglang", base_url=args.reasoner_url)
    return make_backend("local", model_dir=args.reasoner_model_dir)


async def _synth_main(args: argparse.Namespace) -> int:
    from freelm.data import load_problems
    from freelm.evaluation.grade import GraderPool
    from freelm.records import read_rollouts

    api_key = os.environ.get(args.teacher_api_key_env)
    if not api_key:
        raise SystemExit(f"freelm synth: set the teacher's API key in ${args.teacher_api_key_env}")
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    runs = [(path, read_rollouts(path)) for path in args.runs]
    cuts = collect_cuts(runs, load_problems(args.problems), tokenizer, args.clean_every, args.max_cuts_per_trajectory)
    cuts = cuts[: args.limit] if args.limit is not None else cuts
    options = {name: getattr(args, flag[2:].replace("-", "_")) for name, (flag, _) in _teacher_options().items()}
    teacher = OpenAITeacher(args.teacher_base_url, args.teacher_model, api_key, template=args.template, **options)
    reasoner = _reasoner(args)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    loop = LoopConfig(max_tokens=args.max_tokens, context_limit=args.context_limit, sampling=sampling)
    try:
        with GraderPool(workers=args.grader_workers) as pool:
            reward = RewardFilter(
                reasoner, tokenizer, AnswerGrader(pool), args.k, loop, args.comparison, args.margin, args.seed
            )
            synthesizer = Synthesizer(
                teacher,
                reward,
                args.output,
                args.log or args.output.with_suffix(".synth.jsonl"),
                template=args.template,
                keep_empty=args.keep_empty,
                concurrency=args.concurrency,
            )
            summary = await synthesizer.run(cuts, progress=not args.no_progress)
    finally:
        await teacher.aclose()
        await reasoner.aclose()
    print(json.dumps(summary.to_dict(), indent=2))
    return 1 if summary.teacher_errors else 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_synth_main(args))
