"""``freelm train``: LoRA SFT of the Free-Module with TRL's ``SFTTrainer`` and PEFT, on one node.

TRL (transformers' ``Trainer``, accelerate, PEFT) does the training, logging,
checkpoints, resume and every multi-device layout ``accelerate launch`` /
``torchrun`` set up. This module adds what the project relies on (docs/training.md
lists both sides): rows tokenized as ``encode(prompt) + encode(completion)``, the
split SGLang sees at inference, handed to TRL pre-tokenized with a completion mask
(TRL would tokenize ``prompt + completion`` as one text); too-long rows dropped, not
truncated; the recipe recorded and a changed one refused on resume; resume from the
last *complete* checkpoint; the adapter checked by ``check_sglang_adapter``.
torch, transformers, peft and trl are imported inside functions (``import freelm`` stays light).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from freelm.jsonl import append_jsonl
from freelm.training.sft_data import read_rows

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"
#: Settings a resumed run must share with its checkpoint (they shape the weights or the data order).
RESUME_KEYS = (
    "model", "data", "eval_data", "eval_fraction", "rank", "alpha", "target_modules", "batch_size", "grad_accum",
    "max_length", "seed",
)  # fmt: skip
REPORT_TO = ("none", "tensorboard", "wandb")
SCHEDULERS = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu")


def _opt(default: Any, help_text: str, **argparse_kwargs: Any) -> Any:
    """A setting with its ``freelm train --flag`` help (the CLI is generated from :class:`TrainConfig`)."""
    return field(default=default, metadata={"help": help_text, **argparse_kwargs})


@dataclass
class TrainConfig:
    """Every setting of a run; recorded in ``train_config.json`` so a resume can refuse a changed recipe."""

    model: str = field(metadata={"help": "base model directory (HF checkpoint)"})
    data: str = field(metadata={"help": "SFT JSONL (prompt/completion), e.g. from freelm synth"})
    output_dir: str = field(metadata={"help": "adapter directory (also holds checkpoint-N/ and logs)"})
    eval_data: str | None = _opt(None, "held-out JSONL (default: --eval-fraction of --data)", type=str)
    eval_fraction: float = _opt(0.05, "share of --data held out for eval loss")
    rank: int = _opt(16, "LoRA rank r (one uniform rank)")
    alpha: float = _opt(32.0, "lora_alpha; the update is scaled by alpha / r")
    dropout: float = _opt(0.05, "LoRA dropout")
    target_modules: tuple[str, ...] = _opt(ATTENTION_TARGETS, "modules that get a LoRA", nargs="+", type=str)
    lr: float = _opt(1e-4, "peak learning rate")
    scheduler: Literal["cosine", "linear", "constant"] = _opt("cosine", "LR decay after warmup", choices=SCHEDULERS)
    warmup_steps: int = _opt(0, "linear warmup steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping (0: off)")
    epochs: int = _opt(1, "passes over the training rows")
    max_steps: int | None = _opt(None, "optimizer steps (overrides --epochs)", type=int)
    batch_size: int = _opt(1, "rows per micro-batch per process")
    grad_accum: int = _opt(8, "micro-batches per optimizer step")
    max_length: int = _opt(16384, "rows with more prompt+completion tokens are dropped")
    seed: int = _opt(0, "LoRA init, eval split and data order")
    eval_every: int = _opt(50, "eval loss every N steps (and at the end)")
    save_every: int = _opt(50, "checkpoint every N steps")
    device: Literal["auto", "cpu"] = _opt("auto", "auto: what accelerate/torchrun set up; cpu", choices=DEVICES)
    dtype: str | None = _opt(None, "model dtype (default float32 on CPU, bfloat16 on GPU)", type=str)
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass")
    report_to: Literal["none", "tensorboard", "wandb"] = _opt("none", "where metrics go", choices=REPORT_TO)
    progress: bool = _opt(True, "progress bar (--no-progress: off)")

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        low = [n for n in ("rank", "batch_size", "grad_accum", "max_length", "epochs", "eval_every", "save_every")
               if getattr(self, n) < 1] + (["max_steps"] if self.max_steps is not None and self.max_steps < 1 else [])  # fmt: skip
        if low:
            raise ValueError(f"{', '.join(f'{n}={getattr(self, n)}' for n in low)}: must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if self.report_to not in REPORT_TO or self.device not in DEVICES or self.scheduler not in SCHEDULERS:
            raise ValueError(f"report_to must be one of {REPORT_TO}, device of {DEVICES}, scheduler of {SCHEDULERS}")


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    train_examples: int
    eval_examples: int
    dropped_too_long: int
    losses: list[float] = field(default_factory=list)  # per optimizer step of THIS invocation
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)


# --------------------------------------------------------------------------- data


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[dict[str, list]], int]:
    """TRL-ready examples (``input_ids``, ``completion_mask``) that fit ``max_length``, and how many were dropped."""
    examples, dropped = [], 0
    for row in rows:
        prompt, completion = tokenizer.encode(row["prompt"]), tokenizer.encode(row["completion"])
        if not completion or len(prompt) + len(completion) > max_length:
            dropped += 1
            continue
        examples.append(
            {"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)}
        )
    return examples, dropped


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices; at least one training row, no eval when ``fraction`` is 0 or n < 2."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(math.ceil(n * fraction), n - 1) if n >= 2 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def load_examples(config: TrainConfig, tokenizer: Any) -> tuple[list[dict], list[dict], int]:
    rows = [row for _, row in read_rows(config.data)]
    if config.eval_data:
        train_rows, eval_rows = rows, [row for _, row in read_rows(config.eval_data)]
    else:
        train_idx, eval_idx = split_eval(len(rows), config.eval_fraction, config.seed)
        train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
    train, dropped = tokenize_rows(train_rows, tokenizer, config.max_length)
    held_out, dropped_eval = tokenize_rows(eval_rows, tokenizer, config.max_length)
    if not train:
        raise ValueError(f"{config.data}: no training row fits max_length={config.max_length} tokens")
    return train, held_out, dropped + dropped_eval


# --------------------------------------------------------------------------- model and TRL settings


def lora_config(config: TrainConfig) -> Any:
    """The Free-Module LoRA as SGLang serves it: one uniform rank, scaled by alpha / r (no rsLoRA)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        use_rslora=False,
        task_type="CAUSAL_LM",
    )


def _dtype(config: TrainConfig) -> Any:
    import torch

    if config.dtype:
        return getattr(torch, config.dtype)
    on_gpu = config.device == "auto" and torch.cuda.is_available()
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def sft_config(config: TrainConfig, has_eval: bool) -> Any:
    """TRL's ``SFTConfig`` for the recipe (TRL defaults that differ from the project's are set explicitly)."""
    import torch
    from trl import SFTConfig

    dtype = _dtype(config)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # transformers >= 5.2x renamed gradient_checkpointing (TRL's default: True) to activation_checkpointing
    names = {f.name for f in fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return SFTConfig(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch",
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        seed=config.seed,
        data_seed=config.seed,
        bf16=dtype == torch.bfloat16,
        use_cpu=config.device == "cpu",
        ddp_backend="gloo" if config.device == "cpu" and distributed else None,  # CPUs under torchrun: gloo
        **{checkpointing: config.gradient_checkpointing},
        max_length=config.max_length,  # rows are already filtered to fit: nothing is truncated
        completion_only_loss=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_every,
        save_steps=config.save_every,
        save_total_limit=2,  # the newest may be half-written when a run is killed; the one before is complete
        logging_steps=1,
        report_to=[] if config.report_to == "none" else [config.report_to],
        disable_tqdm=not config.progress,
        remove_unused_columns=False,
    )


# --------------------------------------------------------------------------- checkpoints


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (written last) exists."""
    done = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if p.name[len(CHECKPOINT_PREFIX) :].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(done)[1] if done else None


def _check_recipe(config: TrainConfig, checkpoint: Path) -> int:
    """The checkpoint's step, if it was trained with the same recipe (else ValueError naming what changed)."""
    recorded = Path(config.output_dir) / CONFIG_FILE
    theirs = json.loads(recorded.read_text(encoding="utf-8")) if recorded.is_file() else {}
    ours = json.loads(json.dumps(asdict(config)))
    changed = [k for k in RESUME_KEYS if theirs.get(k) != ours[k]]
    if changed:
        raise ValueError(
            f"{checkpoint}: checkpoint was trained with different {', '.join(changed)} (see {recorded}); "
            "use another --output-dir or --restart to discard it"
        )
    return int(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


# --------------------------------------------------------------------------- training


def _callbacks(log_path: Path, result: TrainResult, start_step: int, progress: bool) -> list[Any]:
    """Log events -> ``train_log.jsonl`` (rank 0) and ``result``; a progress bar showing losses, not log dicts."""
    from transformers.trainer_callback import ProgressCallback, TrainerCallback

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "loss" in logs and state.global_step > start_step:
                result.losses.append(float(logs["loss"]))
            if "eval_loss" in logs:
                result.eval_losses.append((state.global_step, float(logs["eval_loss"])))
            if state.is_world_process_zero:
                with log_path.open("a", encoding="utf-8") as log:
                    append_jsonl(log, {"step": state.global_step, **logs})

    class LossesInBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None:
                self.training_bar.set_postfix({k: f"{v:.4g}" for k, v in (logs or {}).items() if k.endswith("loss")})

    return [Record(), LossesInBar()] if progress else [Record()]


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training and save a servable adapter to ``config.output_dir``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    from freelm.tokenizer import Tokenizer
    from freelm.training.adapter_check import check_sglang_adapter

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_pretrained(config.model)
    if tokenizer.hf.pad_token is None:
        tokenizer.hf.pad_token = tokenizer.hf.eos_token
    train_set, eval_set, dropped = load_examples(config, tokenizer)
    checkpoint = last_complete_checkpoint(out)
    start_step = _check_recipe(config, checkpoint) if checkpoint else 0
    result = TrainResult(out, start_step, len(train_set), len(eval_set), dropped)
    args = sft_config(config, has_eval=bool(eval_set))  # first: under DeepSpeed ZeRO-3 it shards the loading
    if args.process_index == 0:
        (out / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
    set_seed(config.seed)  # before the base model and the LoRA init
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=_dtype(config))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_set),
        eval_dataset=Dataset.from_list(eval_set) if eval_set else None,
        processing_class=tokenizer.hf,
        peft_config=lora_config(config),
    )
    for printer in (PrinterCallback, ProgressCallback):  # no log dict per step on stdout: train_log.jsonl has them
        trainer.remove_callback(printer)
    for callback in _callbacks(out / LOG_FILE, result, start_step, config.progress):
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    result.steps = trainer.state.global_step
    if eval_set and (not result.eval_losses or result.eval_losses[-1][0] != result.steps):
        trainer.evaluate()  # eval loss at the end too, not only every eval_every steps
    trainer.save_model(str(out))
    if not trainer.is_world_process_zero():
        return result
    base_config = json.loads((Path(config.model) / "config.json").read_text(encoding="utf-8"))
    problems = check_sglang_adapter(out, base_config=base_config)
    if problems:
        raise RuntimeError(f"{out}: the saved adapter is not servable by SGLang:\n- " + "\n- ".join(problems))
    return result


# --------------------------------------------------------------------------- CLI: freelm train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (``--no-progress`` for ``progress``), plus ``--restart``."""
    parser.add_argument("--restart", action="store_true", help="discard OUTPUT_DIR/checkpoint-* instead of resuming")
    for f in fields(TrainConfig):
        flag, extra = f"--{f.name.replace('_', '-')}", {k: v for k, v in f.metadata.items() if k != "help"}
        if f.default is MISSING:
            parser.add_argument(flag, required=True, help=f.metadata["help"])
        elif isinstance(f.default, bool):
            name = flag if not f.default else f"--no-{f.name.replace('_', '-')}"
            parser.add_argument(
                name, dest=f.name, action="store_false" if f.default else "store_true", help=f.metadata["help"]
            )
        else:
            extra.setdefault("type", type(f.default))
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            parser.add_argument(flag, default=default, help=f"{f.metadata['help']} (default: {f.default})", **extra)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.restart:
        for path in Path(config.output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
    result = train(config)
    last_eval = result.eval_losses[-1][1] if result.eval_losses else None
    summary = {
        "adapter_dir": str(result.adapter_dir),
        "steps": result.steps,
        "train_examples": result.train_examples,
        "eval_examples": result.eval_examples,
        "dropped_too_long": result.dropped_too_long,
        "last_loss": result.losses[-1] if result.losses else None,
        "last_eval_loss": last_eval,
    }
    print(json.dumps(summary, indent=2))
    return 0
