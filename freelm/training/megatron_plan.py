"""Every setting handed to Megatron-Bridge, computed and checked in plain Python.

Megatron-Bridge needs CUDA, Transformer Engine and Python 3.12, so it cannot run
where the project is developed and tested. This module is the layer in front of
it: a :class:`MegatronPlan` holds the model architecture, the LoRA Free-Module,
the parallel layout, the batch/schedule and the paths; :meth:`MegatronPlan.problems`
lists everything Megatron would reject (or silently get wrong) before a
64-GPU job is queued; :meth:`MegatronPlan.overrides` is the flat
``"section.field" -> value`` map the cluster entry point
(``megatron/finetune_freelm.py``) applies onto the recipe's ``ConfigContainer``.

Sources read (megatron-bridge 0.6.2 wheel, megatron-core 0.19.2 wheel):

* recipes: ``megatron/bridge/recipes/qwen/qwen3.py`` (``qwen3_8b_peft_config`` =
  ``h100/qwen3.py: qwen3_8b_peft_1gpu_h100_bf16_config``) and ``qwen3_moe.py``
  (``qwen3_30b_a3b_peft_config`` = ``h100/qwen3_moe.py: qwen3_30b_a3b_peft_4gpu_h100_bf16_config``,
  ``qwen3_235b_a22b_peft_config`` = ``qwen3_235b_a22b_peft_16gpu_h100_bf16_config``,
  whose docstring recommends TP4 PP4 EP4 on 8 nodes x 8 GPUs);
* config field names: ``megatron/bridge/training/config.py`` (``CheckpointConfig``
  ``pretrained_checkpoint``, ``also_save_hf_checkpoint``, ``hf_source_path``),
  ``megatron/training/config/training_config.py`` (``save``, ``load``,
  ``save_interval``, ``train_iters``, ``lr_warmup_iters``...),
  ``megatron/core/model_parallel_config.py`` (parallel sizes);
* divisibility rules: ``megatron/core/transformer/transformer_config.py``
  (heads and query groups by TP; layers plus embedding/loss stages by PP);
* what Megatron only warns about or fixes itself, reported as :meth:`MegatronPlan.warnings`
  with Megatron's own words, not refused: EP with TP and no SP
  (``megatron/core/model_parallel_config.py`` warns) and SP with TP=1
  (``megatron/bridge/models/transformer_config.py: finalize`` turns SP off;
  ``megatron/training/arguments.py`` warns "Disabling sequence parallelism ...").
* base weights: ``checkpoint.pretrained_checkpoint`` may be a Megatron checkpoint or an
  HF directory with ``config.json`` and weight files
  (``training/utils/checkpoint_utils.py: is_hf_checkpoint_dir``, loaded by
  ``training/checkpointing.py: _load_hf_pretrained_checkpoint``), so converting first is optional.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from freelm.model_facts import ARCHITECTURES, ModelArch, arch_mismatches


class PlanError(ValueError):
    """A plan Megatron would reject; the message lists every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid Megatron-Bridge plan:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- architectures

# The architectures are freelm.model_facts' table (shared with the efficiency report). The
# entry point re-reads ``config.json`` at ``model_path`` and refuses a mismatch
# (:func:`~freelm.model_facts.arch_mismatches`), so a wrong directory cannot train with a wrong layout.

#: Megatron module names LoRA can wrap in a Qwen3 decoder layer
#: (``megatron/bridge/peft/lora.py`` default targets). On MoE models ``linear_fc1``/``linear_fc2``
#: are the routed experts: exported as per-expert ``gate/up/down_proj``, which SGLang's LoRA does not
#: serve reliably, so the plan keeps MoE adapters on attention only.
ATTENTION_TARGETS = ("linear_qkv", "linear_proj")
MLP_TARGETS = ("linear_fc1", "linear_fc2")

#: What each Megatron target becomes in the exported HF PEFT adapter (``docs/training/peft.md``).
HF_TARGET_NAMES = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}


# --------------------------------------------------------------------------- plan parts


@dataclass(frozen=True)
class LoraSpec:
    """The Free-Module adapter. Uniform rank only: SGLang reads just r, lora_alpha, target_modules."""

    dim: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ATTENTION_TARGETS

    def hf_target_modules(self) -> list[str]:
        """Target names of the exported adapter, i.e. what ``--lora-target-modules`` must cover."""
        return [name for target in self.target_modules for name in HF_TARGET_NAMES.get(target, ())]


@dataclass(frozen=True)
class Parallelism:
    """Parallel layout; field names follow ``megatron/core/model_parallel_config.py``."""

    nodes: int = 1
    gpus_per_node: int = 8
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    #: count the embedding / loss as pipeline stages' layers (235B recipe: 94 + 2 layers over PP4)
    account_for_embedding_and_loss: bool = False

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)


@dataclass(frozen=True)
class Schedule:
    """Batch, sequence and optimiser schedule (recipe defaults: GBS 32, MBS 1, lr 1e-4 cosine, warmup 10)."""

    global_batch_size: int = 32
    micro_batch_size: int = 1
    seq_length: int = 8192
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 10
    lr_decay_style: str = "cosine"
    train_iters: int = 1000
    save_interval: int = 100
    eval_interval: int = 100
    eval_iters: int = 10
    log_interval: int = 10
    seed: int = 5678


@dataclass(frozen=True)
class Paths:
    """The run's inputs and outputs (the variables the training scripts take)."""

    model_path: str = ""  # local HF checkpoint directory (config, tokenizer; template for the HF adapter export)
    nemo_path: str = ""  # optional Megatron checkpoint from scripts/convert_hf_to_mbridge.py (else: model_path)
    train_fp: str = ""  # the project's SFT JSONL ({"prompt", "completion"} rows)
    output_dir: str = ""
    run_name: str = ""

    @property
    def pretrained_checkpoint(self) -> str:
        """The base weights Megatron-Bridge loads: the converted checkpoint if given, else the HF directory."""
        return self.nemo_path or self.model_path

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tb_logs"


@dataclass(frozen=True)
class Preset:
    """A model size: its architecture and what Megatron-Bridge's own PEFT recipe sets for it."""

    arch_key: str
    recipe: str  # "module:function" of the Megatron-Bridge recipe the entry point starts from
    parallel: Parallelism


PRESETS: dict[str, Preset] = {
    # h100/qwen3.py qwen3_8b_peft_1gpu_h100_bf16_config: TP1 PP1 CP1, no SP. One node of 8 = DP 8.
    "qwen3-8b": Preset(
        "qwen3-8b",
        "megatron.bridge.recipes.qwen.qwen3:qwen3_8b_peft_config",
        Parallelism(nodes=1, gpus_per_node=8),
    ),
    # h100/qwen3_moe.py qwen3_30b_a3b_peft_4gpu_h100_bf16_config: TP4 PP1 EP4 ETP1 SP. One node of 8 = DP 2.
    "qwen3-30b-a3b": Preset(
        "qwen3-30b-a3b",
        "megatron.bridge.recipes.qwen.qwen3_moe:qwen3_30b_a3b_peft_config",
        Parallelism(nodes=1, gpus_per_node=8, tp=4, ep=4, etp=1, sp=True),
    ),
    # h100/qwen3_moe.py qwen3_235b_a22b_peft_16gpu_h100_bf16_config: TP4 PP4 EP4 ETP1 SP with the
    # embedding and loss counted in the pipeline split; "8 nodes, 64 GPUs" = DP 4.
    "qwen3-235b-a22b": Preset(
        "qwen3-235b-a22b",
        "megatron.bridge.recipes.qwen.qwen3_moe:qwen3_235b_a22b_peft_config",
        Parallelism(nodes=8, gpus_per_node=8, tp=4, pp=4, ep=4, etp=1, sp=True, account_for_embedding_and_loss=True),
    ),
}

#: Weight files that make a directory an HF checkpoint for Megatron-Bridge (``checkpoint_utils.py: _has_hf_weight_files``).
_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model-*-of-*.safetensors",
    "pytorch_model-*-of-*.bin",
)
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")  # SchedulerConfig.lr_decay_style


@dataclass(frozen=True)
class MegatronPlan:
    preset: str
    lora: LoraSpec = field(default_factory=LoraSpec)
    parallel: Parallelism | None = None  # None = the preset's recipe layout
    schedule: Schedule = field(default_factory=Schedule)
    paths: Paths = field(default_factory=Paths)
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise PlanError([f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}"])
        if self.parallel is None:
            object.__setattr__(self, "parallel", PRESETS[self.preset].parallel)

    @property
    def arch(self) -> ModelArch:
        return ARCHITECTURES[PRESETS[self.preset].arch_key]

    @property
    def recipe(self) -> str:
        return PRESETS[self.preset].recipe

    # ------------------------------------------------------------------ checks

    def problems(self) -> list[str]:
        """Everything wrong with the plan, in one list (empty = Megatron-Bridge will accept it)."""
        return self._parallel_problems() + self._lora_problems() + self._schedule_problems() + self._path_problems()

    def warnings(self) -> list[str]:
        """What Megatron warns about (or silently fixes) for this layout, in its own words; the plan still runs."""
        p, out = self.parallel, []
        if p.sp and p.tp == 1:  # bridge transformer_config.py finalize() sets SP off; arguments.py says why
            out.append("Disabling sequence parallelism because tensor model parallelism is disabled")
        if p.ep > 1 and p.tp > 1 and not p.sp:  # megatron/core/model_parallel_config.py __post_init__
            out.append(
                "When using expert parallelism and tensor parallelism for training, sequence parallelism must be used"
            )
        return out

    def validate(self) -> MegatronPlan:
        problems = self.problems()
        if problems:
            raise PlanError(problems)
        return self

    def _parallel_problems(self) -> list[str]:
        p, arch, out = self.parallel, self.arch, []
        sizes = {"nodes": p.nodes, "gpus_per_node": p.gpus_per_node, "TP": p.tp, "PP": p.pp, "CP": p.cp}
        sizes |= {"EP": p.ep, "ETP": p.etp}
        bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if bad:
            return [f"parallel sizes must be positive integers: {', '.join(bad)}"]
        world = p.world_size
        if world % (p.tp * p.pp * p.cp):
            out.append(
                f"world size {world} ({p.nodes} nodes x {p.gpus_per_node} GPUs) is not divisible by TP*PP*CP = {p.tp * p.pp * p.cp}"
            )
        if world % (p.etp * p.ep * p.pp):
            out.append(f"world size {world} is not divisible by ETP*EP*PP = {p.etp * p.ep * p.pp}")
        if arch.is_moe:
            if arch.num_experts % p.ep:
                out.append(f"{arch.num_experts} experts are not divisible by EP={p.ep}")
        elif p.ep != 1 or p.etp != 1:
            out.append(f"{self.preset} is dense: EP and ETP must be 1 (got EP={p.ep}, ETP={p.etp})")
        if arch.num_attention_heads % p.tp:
            out.append(f"{arch.num_attention_heads} attention heads are not divisible by TP={p.tp}")
        if arch.num_kv_heads % p.tp:
            out.append(f"{arch.num_kv_heads} KV heads (query groups) are not divisible by TP={p.tp}")
        staged = arch.num_layers + (2 if p.account_for_embedding_and_loss else 0)
        if staged % p.pp:
            extra = " (+ embedding + loss)" if p.account_for_embedding_and_loss else ""
            out.append(f"{arch.num_layers} layers{extra} = {staged} do not split evenly over PP={p.pp}")
        if p.cp > 1 and self.schedule.seq_length % (2 * p.cp):
            out.append(f"seq_length {self.schedule.seq_length} must be divisible by 2*CP = {2 * p.cp}")
        return out

    def _lora_problems(self) -> list[str]:
        lora, out = self.lora, []
        if not isinstance(lora.dim, int) or lora.dim < 1:
            out.append(f"LoRA dim must be a positive integer, got {lora.dim!r}")
        if not isinstance(lora.alpha, int) or lora.alpha < 1:
            out.append(f"LoRA alpha must be a positive integer, got {lora.alpha!r}")
        if not 0.0 <= lora.dropout < 1.0:
            out.append(f"LoRA dropout must be in [0, 1), got {lora.dropout!r}")
        if not lora.target_modules:
            out.append("LoRA target_modules is empty")
        allowed = ATTENTION_TARGETS if self.arch.is_moe else ATTENTION_TARGETS + MLP_TARGETS
        unknown = [t for t in lora.target_modules if t not in allowed]
        if unknown:
            why = " (MoE: attention only, expert LoRA is not served reliably by SGLang)" if self.arch.is_moe else ""
            out.append(f"LoRA targets {unknown} do not exist for {self.preset}; allowed: {list(allowed)}{why}")
        if len(set(lora.target_modules)) != len(lora.target_modules):
            out.append(f"LoRA target_modules has duplicates: {list(lora.target_modules)}")
        return out

    def _schedule_problems(self) -> list[str]:
        s, p, out = self.schedule, self.parallel, []
        for name in ("global_batch_size", "micro_batch_size", "seq_length", "train_iters", "save_interval"):
            value = getattr(s, name)
            if not isinstance(value, int) or value < 1:
                out.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_interval", "eval_iters", "log_interval", "lr_warmup_iters"):
            value = getattr(s, name)
            if not isinstance(value, int) or value < 0:
                out.append(f"{name} must be a non-negative integer, got {value!r}")
        if out:
            return out
        if p.world_size % (p.tp * p.pp * p.cp) == 0:
            per_step = p.data_parallel * s.micro_batch_size
            if s.global_batch_size % per_step:
                out.append(
                    f"global batch {s.global_batch_size} is not divisible by DP ({p.data_parallel}) x micro batch "
                    f"({s.micro_batch_size}) = {per_step}"
                )
        if s.seq_length > self.arch.max_position_embeddings:
            out.append(f"seq_length {s.seq_length} exceeds the model's {self.arch.max_position_embeddings} positions")
        if s.save_interval > s.train_iters:
            out.append(f"save_interval {s.save_interval} > train_iters {s.train_iters}: no checkpoint would be saved")
        elif s.train_iters % s.save_interval:
            out.append(
                f"train_iters {s.train_iters} is not a multiple of save_interval {s.save_interval}: "
                "the last iterations would never be saved"
            )
        if s.lr_warmup_iters >= s.train_iters:
            out.append(f"lr_warmup_iters {s.lr_warmup_iters} must be < train_iters {s.train_iters}")
        if s.eval_interval and s.eval_interval > s.train_iters:
            out.append(f"eval_interval {s.eval_interval} > train_iters {s.train_iters}: validation would never run")
        if not (s.lr > 0 and 0 <= s.min_lr <= s.lr):
            out.append(f"need lr > 0 and 0 <= min_lr <= lr, got lr={s.lr}, min_lr={s.min_lr}")
        if s.lr_decay_style not in _DECAY_STYLES:
            out.append(f"lr_decay_style {s.lr_decay_style!r} is not one of {list(_DECAY_STYLES)}")
        return out

    def _path_problems(self) -> list[str]:
        paths, out = self.paths, []
        for name in ("model_path", "train_fp", "output_dir", "run_name"):
            if not str(getattr(paths, name)).strip():
                out.append(f"{name} is not set")
        if paths.run_name and not _RUN_NAME.match(paths.run_name):
            out.append(f"run_name {paths.run_name!r} must be letters, digits, '.', '_' or '-' (it names a directory)")
        if paths.nemo_path and paths.output_dir and Path(paths.nemo_path).resolve() == paths.checkpoint_dir.resolve():
            out.append("nemo_path (the base checkpoint) must differ from the run's checkpoint directory")
        return out

    def local_model_problems(self) -> list[str]:
        """``model_path`` must be a local HF directory of this preset's shape: the recipe is built from it.

        Without it the 0.6.2 recipes call ``AutoBridge.from_hf_pretrained("Qwen/...")`` on the Hub;
        with no ``nemo_path`` it also holds the base weights (``is_hf_checkpoint_dir``: a weight file).
        """
        import json

        root = Path(self.paths.model_path)
        config_path = root / "config.json"
        if not config_path.is_file():
            return [f"model_path {root}: no config.json (a local HF checkpoint directory is required)"]
        try:
            hf_config = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(hf_config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            return [f"cannot read {config_path}: {exc}"]
        out = [f"{config_path}: {m}" for m in arch_mismatches(self.arch, hf_config)]
        if not self.paths.nemo_path and not any(any(root.glob(pattern)) for pattern in _HF_WEIGHT_FILES):
            out.append(
                f"model_path {root} has no HF weight files ({', '.join(_HF_WEIGHT_FILES)}) and no nemo_path is "
                "given: Megatron-Bridge has no base weights to load"
            )
        return out

    # ------------------------------------------------------------------ outputs

    @property
    def recipe_hf_path(self) -> str:
        """Where the recipe's ``AutoBridge.from_hf_pretrained("Qwen/...")`` is pointed instead of the Hub."""
        return self.paths.model_path

    @property
    def grad_accumulation_steps(self) -> int:
        return self.schedule.global_batch_size // (self.parallel.data_parallel * self.schedule.micro_batch_size)

    def overrides(self) -> dict[str, Any]:
        """``"section.field" -> value`` applied onto the recipe's ``ConfigContainer`` (validated plan only).

        ``model.hf_model_id`` / ``tokenizer.tokenizer_model`` / ``checkpoint.hf_source_path`` point at the
        local ``model_path`` (the recipe itself is built from it too: :attr:`recipe_hf_path`), so nothing
        reads the Hub, and the HF adapter written
        at each save (``iter_*/hf/``, ``training/checkpointing.py: _save_hf_adapter_weights``) names it.
        """
        self.validate()
        p, s, paths = self.parallel, self.schedule, self.paths
        return {
            "model.tensor_model_parallel_size": p.tp,
            "model.pipeline_model_parallel_size": p.pp,
            "model.context_parallel_size": p.cp,
            "model.sequence_parallel": p.sp and p.tp > 1,  # what Megatron-Bridge's finalize() makes of it
            "model.expert_model_parallel_size": p.ep,
            "model.expert_tensor_parallel_size": p.etp,
            "model.account_for_embedding_in_pipeline_split": p.account_for_embedding_and_loss,
            "model.account_for_loss_in_pipeline_split": p.account_for_embedding_and_loss,
            "model.seq_length": s.seq_length,
            "model.hf_model_id": paths.model_path,
            "model.hf_model_revision": None,
            "train.train_iters": s.train_iters,
            "train.global_batch_size": s.global_batch_size,
            "train.micro_batch_size": s.micro_batch_size,
            "optimizer.lr": s.lr,
            "optimizer.min_lr": s.min_lr,
            "scheduler.lr_warmup_iters": s.lr_warmup_iters,
            "scheduler.lr_decay_iters": s.train_iters,
            "scheduler.lr_decay_style": s.lr_decay_style,
            "validation.eval_interval": s.eval_interval or None,  # 0 = no validation (None in Megatron)
            "validation.eval_iters": s.eval_iters,
            "checkpoint.pretrained_checkpoint": paths.pretrained_checkpoint,
            "checkpoint.save": str(paths.checkpoint_dir),
            "checkpoint.load": str(paths.checkpoint_dir),  # resume the adapter run if it has a checkpoint
            "checkpoint.save_interval": s.save_interval,
            "checkpoint.ckpt_format": "torch_dist",
            "checkpoint.also_save_hf_checkpoint": True,
            "checkpoint.hf_source_path": paths.model_path,
            "logger.log_interval": s.log_interval,
            "logger.tensorboard_dir": str(paths.tensorboard_dir),
            "logger.wandb_project": self.wandb_project,
            "logger.wandb_exp_name": paths.run_name if self.wandb_project else None,
            "tokenizer.tokenizer_model": paths.model_path,
            "tokenizer.hf_tokenizer_kwargs": {},
            "rng.seed": s.seed,
        }

    def lora_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``megatron.bridge.peft.lora.LoRA`` (no rank patterns: SGLang ignores them)."""
        return {
            "target_modules": list(self.lora.target_modules),
            "dim": self.lora.dim,
            "alpha": self.lora.alpha,
            "dropout": self.lora.dropout,
            "normalize_moe_lora": False,
        }

    def dataset_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``GPTSFTDatasetConfig`` (``megatron/bridge/data/builders/gpt_sft.py``).

        No offline packing (it needs its own specs and rows here are long); validation runs on
        ``validation.jsonl``, there is no ``test.jsonl``.
        """
        return {
            "seq_length": self.schedule.seq_length,
            "dataset_root": str(self.paths.data_dir),
            "seed": self.schedule.seed,
            "enable_offline_packing": False,
            "offline_packing_specs": None,
            "do_validation": self.schedule.eval_interval > 0,
            "do_test": False,
        }

    def summary(self) -> dict[str, Any]:
        """Everything resolved, JSON-ready: what ``--dry-run`` prints."""
        return {
            "preset": self.preset,
            "recipe": self.recipe,
            "architecture": asdict(self.arch),
            "recipe_hf_path": self.recipe_hf_path,
            "warnings": self.warnings(),
            "world_size": self.parallel.world_size,
            "data_parallel": self.parallel.data_parallel,
            "grad_accumulation_steps": self.grad_accumulation_steps,
            "lora": self.lora_kwargs(),
            "hf_target_modules": self.lora.hf_target_modules(),
            "prompt_completion": PROMPT_COMPLETION_KWARGS,
            "dataset": self.dataset_kwargs(),
            "overrides": self.overrides(),
        }


#: ``PromptCompletionSFTPreprocessingConfig`` (``megatron/bridge/data/sft_processing.py``): loss on the
#: completion only; the completion already ends with ``<|im_end|>`` so no EOS is appended (Qwen3's EOS
#: *is* ``<|im_end|>``: ``add_eos=True`` would train a doubled end of turn); no whitespace stripping so the
#: prompt is token-for-token the one sent at inference; no separator (the prompt ends where the JSON starts).
PROMPT_COMPLETION_KWARGS: dict[str, Any] = {
    "prompt_column": "prompt",
    "completion_column": "completion",
    "separator": "",
    "loss_mode": "completion",
    "strip_whitespace": False,
    "add_bos": False,
    "add_sep": False,
    "add_eos": False,
}


def build_plan(preset: str, **changes: Any) -> MegatronPlan:
    """A plan from a preset plus ``section`` overrides: ``lora=``, ``parallel=``, ``schedule=``, ``paths=`` take
    dicts of field changes (e.g. ``parallel={"nodes": 2}``), ``wandb_project=`` a string. Not yet validated."""
    plan = MegatronPlan(preset=preset)
    sections = {"lora": plan.lora, "parallel": plan.parallel, "schedule": plan.schedule, "paths": plan.paths}
    updates: dict[str, Any] = {}
    for key, value in changes.items():
        if key in sections:
            try:
                updates[key] = replace(sections[key], **value)
            except TypeError as exc:
                raise PlanError([f"{key}: {exc}"]) from exc
        elif key == "wandb_project":
            updates[key] = value or None
        else:
            raise PlanError([f"unknown plan section {key!r}"])
    return replace(plan, **updates)
