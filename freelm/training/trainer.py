"""``freelm train``: LoRA SFT of the Free-Module with PEFT on one GPU or the CPU.

A plain torch loop rather than a trainer framework: the whole recipe (masking,
accumulation, schedule, checkpoint) fits on a screen, and nothing in it can
silently change the adapter format SGLang has to load.

* Each row is tokenized as ``encode(prompt) + encode(completion)``, the same
  split as at inference (the server tokenizes the prompt text alone, then
  generates); only completion tokens carry loss.
* A step is ``grad_accum`` micro-batches of ``batch_size`` rows; the loss is the
  sum over the step's completion tokens divided by their count, so rows count
  by their tokens whatever the accumulation.
* Data order is a pure function of (seed, epoch), so a resumed run continues on
  exactly the batches an uninterrupted one would have seen.
* The adapter is saved with PEFT's default adapter name (files at the top of
  the output directory), one uniform rank, no rsLoRA, and checked with
  :func:`freelm.training.adapter_check.check_sglang_adapter` before the run
  counts as done.

torch, transformers and peft are imported inside functions (``import freelm``
stays light).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from freelm.records import append_jsonl
from freelm.training.sft_data import read_rows

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.jsonl"
#: Settings a resumed run must share with its checkpoint (they shape the weights or the data order).
RESUME_KEYS = (
    "model", "data", "eval_data", "eval_fraction", "rank", "alpha", "target_modules", "batch_size", "grad_accum",
    "max_length", "seed",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Every setting of a run; saved in the checkpoint so a resume can refuse a changed recipe."""

    model: str  # base model directory (HF checkpoint)
    data: str  # SFT JSONL (prompt/completion rows)
    output_dir: str
    eval_data: str | None = None  # held-out JSONL; else ``eval_fraction`` of ``data``
    eval_fraction: float = 0.05
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ATTENTION_TARGETS
    lr: float = 1e-4
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 1
    grad_accum: int = 8
    max_length: int = 16384
    seed: int = 0
    eval_every: int = 50
    save_every: int = 50
    device: str = "auto"
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on a GPU that supports it
    gradient_checkpointing: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        for name in ("rank", "batch_size", "grad_accum", "max_length", "epochs", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")


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


@dataclass(frozen=True)
class Example:
    ids: list[int]
    prompt_len: int  # tokens before the completion (no loss on them)


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, max_length: int) -> tuple[list[Example], int]:
    """Examples that fit ``max_length`` and have completion tokens, and how many rows were dropped."""
    examples, dropped = [], 0
    for row in rows:
        prompt, completion = tokenizer.encode(row["prompt"]), tokenizer.encode(row["completion"])
        if not completion or len(prompt) + len(completion) > max_length:
            dropped += 1
            continue
        examples.append(Example(prompt + completion, len(prompt)))
    return examples, dropped


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices; at least one training row, no eval when ``fraction`` is 0 or n < 2."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(math.ceil(n * fraction), n - 1) if n >= 2 else 0
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def step_groups(n: int, batch_size: int, grad_accum: int, seed: int, start_step: int):
    """Yield each optimizer step's micro-batches (lists of row indices), forever, from ``start_step`` on.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``; its last step may be short.
    """
    per_step = batch_size * grad_accum
    steps_per_epoch = math.ceil(n / per_step)
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        for s in range(skip, steps_per_epoch):
            rows = order[s * per_step : (s + 1) * per_step]
            yield [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        epoch, skip = epoch + 1, 0


def collate(examples: list[Example], pad_id: int, device: Any) -> dict[str, Any]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding)."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels[row, e.prompt_len : len(e.ids)] = torch.tensor(e.ids[e.prompt_len :])
        mask[row, : len(e.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def loss_tokens(examples: list[Example]) -> int:
    """Tokens that carry loss: the causal shift drops none of them (the prompt is never empty of them)."""
    return sum(len(e.ids) - max(e.prompt_len, 1) for e in examples)


# --------------------------------------------------------------------------- model


def _device_and_dtype(config: TrainConfig) -> tuple[Any, Any]:
    import torch

    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if config.dtype:
        return device, getattr(torch, config.dtype)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, torch.bfloat16 if bf16 else torch.float32


def build_model(config: TrainConfig, device: Any, dtype: Any) -> Any:
    """The base model with a fresh LoRA named "default" (a non-default name nests the saved files)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(config.model, dtype=dtype).to(device)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        use_rslora=False,  # SGLang scales by alpha / r
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


def evaluate(model: Any, examples: list[Example], batch_size: int, pad_id: int, device: Any) -> float:
    """Mean loss per completion token over ``examples``."""
    import torch

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            total += float(model(**collate(chunk, pad_id, device), num_items_in_batch=1).loss)
            tokens += loss_tokens(chunk)
    return total / max(tokens, 1)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(model: Any, optimizer: Any, scheduler: Any, step: int, config: TrainConfig) -> Path:
    """Adapter + optimizer + scheduler + step, swapped in atomically (a kill never leaves half a checkpoint)."""
    import torch

    out = Path(config.output_dir)
    final, tmp, old = out / CHECKPOINT, out / f"{CHECKPOINT}.tmp", out / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": asdict(config),
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(model: Any, optimizer: Any, scheduler: Any, config: TrainConfig) -> int:
    """Restore a checkpoint of the same recipe; returns its step (0 when there is none).

    A kill between :func:`save_checkpoint`'s two renames leaves no ``checkpoint/``
    but a whole ``checkpoint.old/``: that one is put back and resumed from.
    """
    import torch
    from peft import load_peft_weights, set_peft_model_state_dict

    path = Path(config.output_dir) / CHECKPOINT
    old = path.with_name(f"{CHECKPOINT}.old")
    if not (path / STATE_FILE).is_file() and (old / STATE_FILE).is_file():
        shutil.rmtree(path, ignore_errors=True)
        old.rename(path)
    if not (path / STATE_FILE).is_file():
        return 0
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    theirs = state["config"]
    changed = [k for k in RESUME_KEYS if _jsonable(theirs.get(k)) != _jsonable(getattr(config, k))]
    if changed:
        raise ValueError(
            f"{path}: checkpoint was trained with different {', '.join(changed)}; "
            "use another --output-dir or --restart to discard it"
        )
    set_peft_model_state_dict(model, load_peft_weights(str(path)))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- training


def load_examples(config: TrainConfig, tokenizer: Any) -> tuple[list[Example], list[Example], int]:
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


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) training and save a servable adapter to ``config.output_dir``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from freelm.tokenizer import Tokenizer
    from freelm.training.adapter_check import check_sglang_adapter

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_pretrained(config.model)
    pad_id = tokenizer.hf.pad_token_id if tokenizer.hf.pad_token_id is not None else tokenizer.eos_token_ids[0]
    train_set, eval_set, dropped = load_examples(config, tokenizer)
    steps_per_epoch = math.ceil(len(train_set) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    torch.manual_seed(config.seed)
    device, dtype = _device_and_dtype(config)
    model = build_model(config, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        config.scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps
    )
    step = load_checkpoint(model, optimizer, scheduler, config)
    result = TrainResult(out, step, len(train_set), len(eval_set), dropped)

    with (out / LOG_FILE).open("a", encoding="utf-8") as log, tqdm(
        total=total_steps, initial=step, desc="train", unit="step", disable=not config.progress
    ) as bar:  # fmt: skip
        groups = step_groups(len(train_set), config.batch_size, config.grad_accum, config.seed, step)
        while step < total_steps:
            micro_batches = [[train_set[i] for i in rows] for rows in next(groups)]
            n_tokens = sum(loss_tokens(mb) for mb in micro_batches)
            model.train()
            loss = 0.0
            for mb in micro_batches:
                part = model(**collate(mb, pad_id, device), num_items_in_batch=n_tokens).loss
                part.backward()
                loss += part.detach().item()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(loss)
            entry: dict[str, Any] = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0]}
            if eval_set and (step % config.eval_every == 0 or step == total_steps):
                entry["eval_loss"] = evaluate(model, eval_set, config.batch_size, pad_id, device)
                result.eval_losses.append((step, entry["eval_loss"]))
            append_jsonl(log, entry)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k.endswith("loss")})
            if step % config.save_every == 0 and step < total_steps:
                save_checkpoint(model, optimizer, scheduler, step, config)

    save_checkpoint(model, optimizer, scheduler, step, config)
    model.save_pretrained(out)
    result.steps = step
    base_config = json.loads((Path(config.model) / "config.json").read_text(encoding="utf-8"))
    problems = check_sglang_adapter(out, base_config=base_config)
    if problems:
        raise RuntimeError(f"{out}: the saved adapter is not servable by SGLang:\n- " + "\n- ".join(problems))
    return result


# --------------------------------------------------------------------------- CLI: freelm train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig(model="", data="", output_dir="")
    parser.add_argument("--model", required=True, help="base model directory (HF checkpoint)")
    parser.add_argument("--data", required=True, help="SFT JSONL (prompt/completion), e.g. from freelm synth")
    parser.add_argument("--output-dir", required=True, help="adapter directory (also holds checkpoint/ and logs)")
    parser.add_argument("--eval-data", help="held-out JSONL (default: --eval-fraction of --data)")
    parser.add_argument("--restart", action="store_true", help="discard OUTPUT_DIR/checkpoint instead of resuming")
    parser.add_argument("--target-modules", nargs="+", default=list(defaults.target_modules))
    parser.add_argument("--scheduler", choices=("cosine", "linear", "constant"), default=defaults.scheduler)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    for name, kind, help_text in (
        ("eval_fraction", float, "share of --data held out for eval loss"),
        ("rank", int, "LoRA rank r (one uniform rank)"),
        ("alpha", float, "lora_alpha; the update is scaled by alpha / r"),
        ("dropout", float, "LoRA dropout"),
        ("lr", float, "peak learning rate"),
        ("warmup_steps", int, "linear warmup steps"),
        ("weight_decay", float, "AdamW weight decay"),
        ("max_grad_norm", float, "gradient clipping (0: off)"),
        ("epochs", int, "passes over the training rows"),
        ("max_steps", int, "optimizer steps (overrides --epochs)"),
        ("batch_size", int, "rows per micro-batch"),
        ("grad_accum", int, "micro-batches per optimizer step"),
        ("max_length", int, "rows with more prompt+completion tokens are dropped"),
        ("seed", int, "LoRA init, eval split and data order"),
        ("eval_every", int, "eval loss every N steps (and at the end)"),
        ("save_every", int, "checkpoint every N steps"),
        ("device", str, "auto, cpu, cuda, cuda:1, ..."),
        ("dtype", str, "model dtype (default float32 on CPU, bfloat16 on GPU)"),
    ):
        default = getattr(defaults, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"{help_text} (default: {default})"
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["progress"] = not args.no_progress
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.restart:
        for name in (CHECKPOINT, f"{CHECKPOINT}.old", f"{CHECKPOINT}.tmp"):
            shutil.rmtree(Path(config.output_dir) / name, ignore_errors=True)
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
