"""Train the Free-Module LoRA with Megatron-Bridge: the program torchrun starts on every GPU.

Three modes, all driven by one plan (``freelm/training/megatron_plan.py``):

* ``--dry-run``: resolve and validate the plan against the local HF checkpoint at
  ``--model-path`` (its ``config.json`` must have the preset's shape), print Megatron's
  warnings for the layout and the plan as JSON, exit. Imports no Megatron code and
  reads nothing from the Hub, so it runs anywhere (and in the project's tests).
* ``--prepare-data``: write the SFT layout Megatron-Bridge reads
  (``<output_dir>/<run_name>/data/{training,validation}.jsonl``) from ``--train-fp``,
  dropping rows longer than ``--seq-length`` tokens. Run it once, before torchrun.
* default: check the layout and the checkpoint's ``config.json`` against the plan,
  then build Megatron-Bridge's own PEFT recipe for the model size FROM ``--model-path``
  (the 0.6.2 recipes call ``AutoBridge.from_hf_pretrained("Qwen/...")`` while they are
  built; :func:`local_recipe` points that call at the local directory, and
  ``HF_HUB_OFFLINE=1`` makes any other Hub access fail at once), apply the plan's
  overrides, and call ``megatron.bridge.training.finetune.finetune`` with
  ``megatron.bridge.training.gpt_step.forward_step``. The base weights come from
  ``--nemo-path`` when given, else straight from the HF directory.

This directory has no ``__init__.py`` on purpose: ``megatron`` is the namespace
package of megatron-core and megatron-bridge, and this folder must never shadow it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `freelm`

from freelm.training.cluster_data import read_sft_layout, write_sft_layout  # noqa: E402
from freelm.training.megatron_plan import (  # noqa: E402
    ATTENTION_TARGETS,
    MLP_TARGETS,
    PRESETS,
    PROMPT_COMPLETION_KWARGS,
    MegatronPlan,
    PlanError,
    build_plan,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Free-Module LoRA fine-tuning with Megatron-Bridge (see docs/training.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the resolved plan as JSON and exit")
    mode.add_argument("--prepare-data", action="store_true", help="write the SFT layout and exit")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    paths = p.add_argument_group("paths")
    paths.add_argument("--model-path", default="", help="local HF checkpoint directory of the base model")
    paths.add_argument(
        "--nemo-path",
        default="",
        help="optional Megatron checkpoint from scripts/convert_hf_to_mbridge.py (default: load the HF weights "
        "of --model-path directly)",
    )
    paths.add_argument("--train-fp", default="", help="SFT JSONL with prompt/completion rows")
    paths.add_argument("--output-dir", default="")
    paths.add_argument("--run-name", default="")
    par = p.add_argument_group("parallelism (default: the preset's Megatron-Bridge recipe)")
    for flag in ("nodes", "gpus-per-node", "tp", "pp", "cp", "ep", "etp"):
        par.add_argument(f"--{flag}", type=int)
    par.add_argument("--sp", action=argparse.BooleanOptionalAction, default=None, help="sequence parallelism")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-dim", type=int)
    lora.add_argument("--lora-alpha", type=int)
    lora.add_argument("--lora-dropout", type=float)
    lora.add_argument("--lora-targets", nargs="+", choices=ATTENTION_TARGETS + MLP_TARGETS)
    sched = p.add_argument_group("schedule")
    for flag, kind in (
        ("global-batch-size", int),
        ("micro-batch-size", int),
        ("seq-length", int),
        ("lr", float),
        ("min-lr", float),
        ("lr-warmup-iters", int),
        ("train-iters", int),
        ("save-interval", int),
        ("eval-interval", int),
        ("eval-iters", int),
        ("log-interval", int),
        ("seed", int),
    ):
        sched.add_argument(f"--{flag}", type=kind)
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--validation-fraction", type=float, default=0.02, help="share of rows held out (--prepare-data)")
    return p


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    return {field: getattr(args, attr) for attr, field in names.items() if getattr(args, attr) is not None}


def plan_from_args(args: argparse.Namespace) -> MegatronPlan:
    lora = _given(args, {"lora_dim": "dim", "lora_alpha": "alpha", "lora_dropout": "dropout"})
    if args.lora_targets:
        lora["target_modules"] = tuple(args.lora_targets)
    parallel = _given(args, {k: k for k in ("nodes", "gpus_per_node", "tp", "pp", "cp", "ep", "etp", "sp")})
    schedule = _given(
        args,
        {
            k: k
            for k in (
                "global_batch_size",
                "micro_batch_size",
                "seq_length",
                "lr",
                "min_lr",
                "lr_warmup_iters",
                "train_iters",
                "save_interval",
                "eval_interval",
                "eval_iters",
                "log_interval",
                "seed",
            )
        },
    )
    paths = {k: getattr(args, k) for k in ("model_path", "nemo_path", "train_fp", "output_dir", "run_name")}
    plan = build_plan(
        args.preset, lora=lora, parallel=parallel, schedule=schedule, paths=paths, wandb_project=args.wandb_project
    )
    return plan.validate()


def prepare_data(plan: MegatronPlan, validation_fraction: float) -> None:
    from freelm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(plan.paths.model_path)
    layout = write_sft_layout(
        plan.paths.train_fp,
        plan.paths.data_dir,
        validation_fraction=validation_fraction,
        count_tokens=lambda text: len(tokenizer.encode(text)),
        max_tokens=plan.schedule.seq_length,
    )
    print(json.dumps({"data_dir": str(plan.paths.data_dir), **layout.__dict__}, indent=2))


def preflight(plan: MegatronPlan) -> None:
    """Refuse to start 64 GPUs on a stale layout, a different model, missing weights or a different world size."""
    problems = plan.local_model_problems()
    if read_sft_layout(plan.paths.train_fp, plan.paths.data_dir, plan.schedule.seq_length) is None:
        problems.append(
            f"no current SFT layout of {plan.paths.train_fp} in {plan.paths.data_dir}: run this script with "
            "--prepare-data (same arguments) first"
        )
    if plan.paths.nemo_path and not Path(plan.paths.nemo_path).exists():
        problems.append(
            f"nemo_path {plan.paths.nemo_path} does not exist: run scripts/convert_hf_to_mbridge.py, or leave "
            "--nemo-path out to load the HF weights of --model-path"
        )
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) != plan.parallel.world_size:
        problems.append(f"torchrun started {world} processes but the plan is for {plan.parallel.world_size} GPUs")
    if problems:
        raise PlanError(problems)


def _set(container: Any, dotted: str, value: Any) -> None:
    *parents, name = dotted.split(".")
    target = container
    for part in parents:
        target = getattr(target, part)
    if not hasattr(target, name):  # a renamed field must fail loudly, not be silently added
        raise AttributeError(f"{type(target).__name__} has no field {name!r} (override {dotted})")
    setattr(target, name, value)


@contextlib.contextmanager
def local_recipe(module: Any, hf_path: str):
    """While a recipe of ``module`` is built, its ``AutoBridge.from_hf_pretrained(<Hub id>, revision=...)``
    loads ``hf_path`` instead (no revision: a local directory has none).

    The 0.6.2 recipes (``recipes/qwen/h100/qwen3.py``, ``qwen3_moe.py``) take no model path; they name
    ``AutoBridge`` as a module global, so replacing that global for the duration of the call is the one
    place to redirect them. Everything the recipe reads then (architecture, RoPE base, context length)
    is the local checkpoint's own ``config.json``, e.g. the Thinking-2507 release rather than the base id.
    """
    real = module.AutoBridge

    class _LocalAutoBridge:
        @staticmethod
        def from_hf_pretrained(_hub_id: str, *args: Any, revision: str | None = None, **kwargs: Any) -> Any:
            return real.from_hf_pretrained(hf_path, *args, **kwargs)

    module.AutoBridge = _LocalAutoBridge
    try:
        yield
    finally:
        module.AutoBridge = real


def train(plan: MegatronPlan) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: a Hub access is a bug, fail at once
    from megatron.bridge.data.builders import GPTSFTDatasetConfig
    from megatron.bridge.data.sft_processing import PromptCompletionSFTPreprocessingConfig
    from megatron.bridge.peft.lora import LoRA
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.gpt_step import forward_step

    module_name, function = plan.recipe.split(":")
    recipe_function = getattr(importlib.import_module(module_name), function)
    recipe_module = importlib.import_module(recipe_function.__module__)  # qwen3.py re-exports from h100/qwen3.py
    with local_recipe(recipe_module, plan.recipe_hf_path):
        cfg = recipe_function(peft_scheme=LoRA(**plan.lora_kwargs()))
    for dotted, value in plan.overrides().items():
        _set(cfg, dotted, value)
    cfg.dataset = GPTSFTDatasetConfig(
        **plan.dataset_kwargs(), preprocessing=PromptCompletionSFTPreprocessingConfig(**PROMPT_COMPLETION_KWARGS)
    )
    finetune(cfg, forward_step)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_args(args)
        for warning in plan.warnings():
            print(f"warning (Megatron): {warning}", file=sys.stderr)
        if args.dry_run:
            problems = plan.local_model_problems()
            if problems:
                raise PlanError(problems)
            print(json.dumps(plan.summary(), indent=2, default=str))
            return 0
        if args.prepare_data:
            prepare_data(plan, args.validation_fraction)
            return 0
        preflight(plan)
    except (PlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
