"""The ``freelm`` command: one entry point, one subcommand per tool.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``freelm --help`` is instant and never imports torch. The top-level scripts
(``runner.py``, ``eval_passk.py``, ``llm_judge.py``) call the same modules.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: (subcommand, module[:object], one-line help). "data check" is spelled with a space.
COMMANDS: list[tuple[str, str, str]] = [
    ("run", "freelm.run.cli", "run rollouts (vanilla or Free()LM) over a benchmark; resumable"),
    ("eval", "freelm.evaluation.eval_cli", "grade runner outputs: pass@k, #Token, paper-format table, plots"),
    ("judge", "freelm.evaluation.judge_cli", "LLM-judge answers a rule-based grader cannot settle"),
    ("report", "freelm.evaluation.report_cli", "efficiency report: KV cache per sample, tokens, latency overhead"),
    ("view", "freelm.viewer", "render one rollout as a self-contained HTML trace"),
    ("synth", "freelm.training.synth_cli", "reward-filtered synthesis of Free-Module training data"),
    ("train", "freelm.training.trainer", "train the Free-Module LoRA with TRL + PEFT (CPU, one GPU or one node)"),
    ("data check", "freelm.training.sft_data", "check a Free-Module SFT JSONL file"),
    ("data prepare", "freelm.benchmarks.cli:prepare", "download the paper's benchmarks at pinned revisions"),
    ("data list", "freelm.benchmarks.cli:listing", "list the benchmarks `data prepare` knows: source, revision"),
    ("template infer", "freelm.template_infer", "recover a released Free-Module's cleaning prompt from its SFT rows"),
    ("demo", "freelm.demo.run", "run the embedded default end to end (vanilla vs Free()LM)"),
]


def _module(name: str):
    """``package.module`` or ``package.module:object`` (one module holding several subcommands)."""
    module, _, attr = name.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freelm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    wanted = argv[0] if argv else None
    for command, module, help_text in COMMANDS:
        head, _, tail = command.partition(" ")
        if tail:
            if head not in groups:
                group = sub.add_parser(head, help=f"{head} tools")
                groups[head] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            target = groups[head].add_parser(tail, help=help_text, description=help_text)
        else:
            target = sub.add_parser(head, help=help_text, description=help_text)
        target.set_defaults(_module=module)
        if head == wanted:  # import only the module that will run
            _module(module).add_arguments(target)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    return int(_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
