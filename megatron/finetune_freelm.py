"""Train the Free-Module LoRA with Megatron-Bridge: the program torchrun starts on every GPU.

Three modes, all driven by one plan (``freelm/training/megatron_plan.py``):

* ``--dry-run``: resolve and validate the plan, print it as JSON, exit. Imports no
  Megatron code, so it runs anywhere (and in the project's tests).
* ``--prepare-data``: write the SFT layout Megatron-Bridge reads
  (``<output_dir>/<run_name>/data/{training,validation}.jsonl``) from ``--train-fp``,
  dropping rows longer than ``--seq-length`` tokens. Run it once, before torchrun.
* default: check the layout and the checkpoint's ``config.json`` against the plan,
  then start from Megatron-Bridge's own PEFT recipe for the model size, apply the
  plan's overrides, and call ``megatron.bridge.training.finetune.finetune`` with
  ``megatron.bridge.training.gpt_step.forward_step``.

This directory has no ``__init__.py`` on purpose: ``megatron`` is the namespace
package of megatron-core and megatron-bridge, and this folder must never shadow it.
"""

from __future__ import annotations

import argparse
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
    arch_mismatches,
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
    paths.add_argument("--nemo-path", default="", help="Megatron checkpoint from scripts/convert_hf_to_mbridge.py")
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
    """Refuse to start 64 GPUs on a stale layout, a different model, or a different world size."""
    problems = []
    if read_sft_layout(plan.paths.train_fp, plan.paths.data_dir, plan.schedule.seq_length) is None:
        problems.append(
            f"no current SFT layout of {plan.paths.train_fp} in {plan.paths.data_dir}: run this script with "
            "--prepare-data (same arguments) first"
        )
    config_path = Path(plan.paths.model_path) / "config.json"
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
        problems += [f"{config_path}: {m}" for m in arch_mismatches(plan.arch, hf_config)]
    except (OSError, ValueError) as exc:
        problems.append(f"cannot read {config_path}: {exc}")
    if not Path(plan.paths.nemo_path).exists():
        problems.append(f"nemo_path {plan.paths.nemo_path} does not exist: run scripts/convert_hf_to_mbridge.py")
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


def train(plan: MegatronPlan) -> None:
    from megatron.bridge import AutoBridge
    from megatron.bridge.data.builders import GPTSFTDatasetConfig
    from megatron.bridge.data.sft_processing import PromptCompletionSFTPreprocessingConfig
    from megatron.bridge.peft.lora import LoRA
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.gpt_step import forward_step

    module, function = plan.recipe.split(":")
    recipe = getattr(importlib.import_module(module), function)
    cfg = recipe(peft_scheme=LoRA(**plan.lora_kwargs()))
    # The recipe builds its model from the Hub base id (e.g. Qwen/Qwen3-30B-A3B); the checkpoint being
    # trained (e.g. the Thinking-2507 release) can differ in RoPE base and context, so the architecture
    # fields come from model_path's own config (models/conversion/model_bridge.py: CONFIG_MAPPING).
    local = AutoBridge.from_hf_pretrained(plan.paths.model_path).to_megatron_provider(load_weights=False)
    for name in ARCH_FIELDS:
        if hasattr(local, name):
            _set(cfg, f"model.{name}", getattr(local, name))
    for dotted, value in plan.overrides().items():
        _set(cfg, dotted, value)
    cfg.dataset = GPTSFTDatasetConfig(
        **plan.dataset_kwargs(), preprocessing=PromptCompletionSFTPreprocessingConfig(**PROMPT_COMPLETION_KWARGS)
    )
    finetune(cfg, forward_step)


#: Provider fields set from the HF config by Megatron-Bridge's Qwen3 bridges (``model_bridge.py: CONFIG_MAPPING``,
#: ``qwen/qwen3_moe_bridge.py``), copied from the local checkpoint over the recipe's Hub model.
ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "layernorm_epsilon",
    "share_embeddings_and_output_weights",
    "rotary_base",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_router_pre_softmax",
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_args(args)
        if args.dry_run:
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
