"""The plain-Python Megatron-Bridge layer: plans for the three model sizes, their checks, the SFT layout."""

from __future__ import annotations

import json
import os

import pytest
from repo_paths import REPO

from freelm.model_facts import ARCHITECTURES, arch_mismatches
from freelm.training.cluster_data import read_sft_layout, write_sft_layout
from freelm.training.megatron_plan import PRESETS, PROMPT_COMPLETION_KWARGS, PlanError, build_plan

PATHS = {"model_path": "/m", "nemo_path": "/n", "train_fp": "/t.jsonl", "output_dir": "/o", "run_name": "free-1"}


def plan(preset: str, **changes):
    changes.setdefault("paths", PATHS)
    return build_plan(preset, **changes)


@pytest.mark.parametrize(
    ("preset", "world", "dp", "accum", "layout"),
    [
        ("qwen3-8b", 8, 8, 4, (1, 1, 1, 1, 1, False)),
        ("qwen3-30b-a3b", 8, 2, 16, (4, 1, 1, 4, 1, True)),
        ("qwen3-235b-a22b", 64, 4, 8, (4, 4, 1, 4, 1, True)),
    ],
)
def test_presets_follow_the_recipes_and_validate(preset, world, dp, accum, layout):
    p = plan(preset).validate()
    par = p.parallel
    assert (par.tp, par.pp, par.cp, par.ep, par.etp, par.sp) == layout
    assert (par.world_size, par.data_parallel, p.grad_accumulation_steps) == (world, dp, accum)
    assert p.lora_kwargs() == {
        "target_modules": ["linear_qkv", "linear_proj"],
        "dim": 8,
        "alpha": 16,
        "dropout": 0.0,
        "normalize_moe_lora": False,
    }
    assert p.lora.hf_target_modules() == ["q_proj", "k_proj", "v_proj", "o_proj"]
    o = p.overrides()
    assert o["model.tensor_model_parallel_size"] == par.tp
    assert o["model.expert_model_parallel_size"] == par.ep
    assert o["checkpoint.pretrained_checkpoint"] == "/n"
    assert o["checkpoint.save"] == o["checkpoint.load"] == "/o/free-1/checkpoints"
    assert o["checkpoint.hf_source_path"] == o["tokenizer.tokenizer_model"] == o["model.hf_model_id"] == "/m"
    assert o["checkpoint.also_save_hf_checkpoint"] is True
    assert o["scheduler.lr_decay_iters"] == o["train.train_iters"] == 1000
    assert p.dataset_kwargs()["dataset_root"] == "/o/free-1/data"
    assert (
        p.recipe.split(":")[1]
        == {
            "qwen3-8b": "qwen3_8b_peft_config",
            "qwen3-30b-a3b": "qwen3_30b_a3b_peft_config",
            "qwen3-235b-a22b": "qwen3_235b_a22b_peft_config",
        }[preset]
    )
    json.dumps(p.summary())  # dry-run output is JSON-ready


def test_235b_needs_the_embedding_and_loss_stages_to_split_94_layers_over_pp4():
    p = plan("qwen3-235b-a22b")
    assert p.overrides()["model.account_for_embedding_in_pipeline_split"] is True
    bad = plan("qwen3-235b-a22b", parallel={"account_for_embedding_and_loss": False})
    assert any("94 layers = 94 do not split evenly over PP=4" in m for m in bad.problems())


@pytest.mark.parametrize(
    ("preset", "changes", "needle"),
    [
        ("qwen3-8b", {"parallel": {"tp": 3}}, "not divisible by TP*PP*CP = 3"),
        ("qwen3-235b-a22b", {"parallel": {"nodes": 6, "ep": 8}}, "not divisible by ETP*EP*PP = 32"),
        (
            "qwen3-30b-a3b",
            {"parallel": {"ep": 3, "gpus_per_node": 12, "tp": 1, "sp": False}},
            "128 experts are not divisible by EP=3",
        ),
        ("qwen3-8b", {"parallel": {"ep": 2}}, "dense: EP and ETP must be 1"),
        (
            "qwen3-235b-a22b",
            {"parallel": {"tp": 8, "nodes": 16}},
            "4 KV heads (query groups) are not divisible by TP=8",
        ),
        (
            "qwen3-8b",
            {"schedule": {"global_batch_size": 12}},
            "global batch 12 is not divisible by DP (8) x micro batch (1) = 8",
        ),
        ("qwen3-8b", {"schedule": {"micro_batch_size": 0}}, "micro_batch_size must be a positive integer"),
        ("qwen3-8b", {"schedule": {"seq_length": 65536}}, "exceeds the model's 40960 positions"),
        ("qwen3-8b", {"parallel": {"cp": 2}, "schedule": {"seq_length": 8194}}, "divisible by 2*CP = 4"),
        ("qwen3-8b", {"schedule": {"save_interval": 2000}}, "no checkpoint would be saved"),
        ("qwen3-8b", {"schedule": {"save_interval": 300}}, "not a multiple of save_interval 300"),
        ("qwen3-8b", {"schedule": {"lr_warmup_iters": 1000}}, "lr_warmup_iters 1000 must be < train_iters"),
        ("qwen3-8b", {"schedule": {"min_lr": 1.0}}, "min_lr <= lr"),
        ("qwen3-8b", {"schedule": {"lr_decay_style": "cosine-ish"}}, "lr_decay_style"),
        (
            "qwen3-30b-a3b",
            {"lora": {"target_modules": ("linear_qkv", "linear_fc1")}},
            "['linear_fc1'] do not exist for qwen3-30b-a3b",
        ),
        ("qwen3-8b", {"lora": {"target_modules": ("q_proj",)}}, "['q_proj'] do not exist"),
        ("qwen3-8b", {"lora": {"target_modules": ()}}, "target_modules is empty"),
        ("qwen3-8b", {"lora": {"dim": 0}}, "LoRA dim must be a positive integer"),
        ("qwen3-8b", {"lora": {"dropout": 1.0}}, "dropout"),
        ("qwen3-8b", {"paths": {**PATHS, "run_name": ""}}, "run_name is not set"),
        ("qwen3-8b", {"paths": {**PATHS, "run_name": "a/b"}}, "must be letters, digits"),
        ("qwen3-8b", {"paths": {**PATHS, "nemo_path": "/o/free-1/checkpoints"}}, "must differ"),
    ],
)
def test_invalid_plans_are_rejected_with_the_reason(preset, changes, needle):
    p = plan(preset, **changes)
    with pytest.raises(PlanError) as err:
        p.validate()
    assert needle in str(err.value), err.value.problems
    with pytest.raises(PlanError):
        p.overrides()  # nothing is handed to Megatron from an invalid plan


def test_layouts_megatron_only_warns_about_or_fixes_run_with_its_warning():
    """megatron-core warns on EP x TP without SP; Megatron-Bridge's finalize() turns SP off at TP=1 (arguments.py)."""
    sp_tp1 = plan("qwen3-8b", parallel={"sp": True}).validate()
    assert sp_tp1.warnings() == ["Disabling sequence parallelism because tensor model parallelism is disabled"]
    assert sp_tp1.overrides()["model.sequence_parallel"] is False
    ep_no_sp = plan("qwen3-30b-a3b", parallel={"sp": False}).validate()
    assert ep_no_sp.warnings() == [
        "When using expert parallelism and tensor parallelism for training, sequence parallelism must be used"
    ]
    assert ep_no_sp.overrides()["model.sequence_parallel"] is False
    assert all(plan(preset).warnings() == [] for preset in PRESETS)
    assert plan("qwen3-8b", parallel={"sp": True}).summary()["warnings"] == sp_tp1.warnings()


def test_without_nemo_path_the_hf_directory_is_the_pretrained_checkpoint():
    """Megatron-Bridge 0.6.2 loads an HF directory given as checkpoint.pretrained_checkpoint (is_hf_checkpoint_dir)."""
    hf_only = plan("qwen3-8b", paths={**PATHS, "nemo_path": ""}).validate()
    assert hf_only.overrides()["checkpoint.pretrained_checkpoint"] == "/m"
    assert plan("qwen3-8b").overrides()["checkpoint.pretrained_checkpoint"] == "/n"


def write_hf_dir(root, preset: str, weights: bool = True):
    """A local HF checkpoint directory of the preset's shape (config.json; an index file stands for the weights)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(ARCHITECTURES[PRESETS[preset].arch_key].hf_config()))
    if weights:
        (root / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    return root


def test_local_model_problems(tmp_path):
    empty = plan("qwen3-8b", paths={**PATHS, "model_path": str(tmp_path / "none")})
    assert "no config.json" in empty.local_model_problems()[0]
    good = write_hf_dir(tmp_path / "8b", "qwen3-8b")
    assert plan("qwen3-8b", paths={**PATHS, "model_path": str(good)}).local_model_problems() == []
    wrong = plan("qwen3-30b-a3b", paths={**PATHS, "model_path": str(good)}).local_model_problems()
    assert any("num_hidden_layers: checkpoint has 36, plan expects 48" in m for m in wrong), wrong
    bare = write_hf_dir(tmp_path / "bare", "qwen3-8b", weights=False)
    no_weights = plan("qwen3-8b", paths={**PATHS, "model_path": str(bare), "nemo_path": ""})
    assert any("no HF weight files" in m for m in no_weights.local_model_problems())
    assert plan("qwen3-8b", paths={**PATHS, "model_path": str(bare)}).local_model_problems() == []  # nemo_path has them


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dry_run_builds_the_plan_from_a_local_hf_path_with_the_hub_offline(preset, tmp_path):
    import subprocess
    import sys

    model = write_hf_dir(tmp_path / "model", preset)
    entry = REPO / "megatron" / "finetune_freelm.py"
    cmd = [sys.executable, str(entry), "--dry-run", "--preset", preset, "--model-path", str(model)]
    cmd += ["--train-fp", str(tmp_path / "sft.jsonl"), "--output-dir", str(tmp_path / "runs"), "--run-name", "r"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["recipe_hf_path"] == str(model)
    o = summary["overrides"]
    assert (
        o["checkpoint.pretrained_checkpoint"] == o["tokenizer.tokenizer_model"] == o["model.hf_model_id"] == str(model)
    )
    assert not (tmp_path / "hf-home").exists()  # nothing looked at the Hub cache

    mismatched = write_hf_dir(tmp_path / "other", "qwen3-8b" if preset != "qwen3-8b" else "qwen3-30b-a3b")
    refused = subprocess.run(
        [*cmd[:6], str(mismatched), *cmd[7:]], capture_output=True, text=True, env=env, timeout=120
    )
    assert refused.returncode == 2 and "num_hidden_layers: checkpoint has" in refused.stderr


def test_local_recipe_points_the_recipes_hub_id_at_the_local_directory():
    """The 0.6.2 recipes call AutoBridge.from_hf_pretrained("Qwen/...", revision=...) as a module global."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("finetune_freelm", REPO / "megatron" / "finetune_freelm.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    calls = []

    class AutoBridge:
        @staticmethod
        def from_hf_pretrained(path, **kwargs):
            calls.append((path, kwargs))
            return path

    recipes = types.SimpleNamespace(AutoBridge=AutoBridge)
    with entry.local_recipe(recipes, "/models/qwen3-8b-local"):
        assert recipes.AutoBridge.from_hf_pretrained("Qwen/Qwen3-8B", revision="b968826d") == "/models/qwen3-8b-local"
    assert calls == [("/models/qwen3-8b-local", {})]
    assert recipes.AutoBridge is AutoBridge  # restored


def test_dense_model_may_train_mlp_loras_and_exports_their_hf_names():
    p = plan("qwen3-8b", lora={"target_modules": ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")})
    assert p.problems() == []
    assert p.lora.hf_target_modules() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_scaling_out_changes_data_parallel_not_model_parallel():
    p = plan("qwen3-235b-a22b", parallel={"nodes": 16}, schedule={"global_batch_size": 64})
    assert p.validate().parallel.data_parallel == 8 and p.grad_accumulation_steps == 8


def test_unknown_preset_and_sections():
    with pytest.raises(PlanError, match="unknown preset"):
        build_plan("qwen3-4b")
    with pytest.raises(PlanError, match="unknown plan section"):
        build_plan("qwen3-8b", optimizer={})
    with pytest.raises(PlanError, match="schedule"):
        build_plan("qwen3-8b", schedule={"epochs": 3})


def test_architecture_table_and_checkpoint_config_check():
    assert set(PRESETS) == set(ARCHITECTURES)
    arch = ARCHITECTURES["qwen3-30b-a3b"]
    hf = {
        "num_hidden_layers": 48,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
    }
    assert arch_mismatches(arch, hf) == []
    wrong = arch_mismatches(arch, {**hf, "num_hidden_layers": 94, "moe_intermediate_size": 1536})
    assert len(wrong) == 2 and "num_hidden_layers: checkpoint has 94, plan expects 48" in wrong[0]
    dense = arch_mismatches(ARCHITECTURES["qwen3-8b"], {**hf, "num_experts": 128})
    assert any("checkpoint is MoE" in m for m in dense)


def test_completion_only_loss_without_a_second_eos():
    assert PROMPT_COMPLETION_KWARGS["loss_mode"] == "completion"
    assert PROMPT_COMPLETION_KWARGS["add_eos"] is False  # the completion carries <|im_end|> itself
    assert PROMPT_COMPLETION_KWARGS["strip_whitespace"] is False


# --------------------------------------------------------------------------- SFT layout


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"prompt": f"<|im_start|>user\nclean {i}<|im_end|>\n<|im_start|>assistant\n", "completion": c + "<|im_end|>"}
    for i, c in enumerate(['[{"prefix": "a", "suffix": "b"}]', "[]"] * 20)
]


def test_layout_writes_the_files_megatron_reads(tmp_path):
    src = _write_rows(tmp_path / "sft.jsonl", ROWS)
    layout = write_sft_layout(src, tmp_path / "data", validation_fraction=0.2)
    train = [json.loads(line) for line in (tmp_path / "data/training.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (tmp_path / "data/validation.jsonl").read_text().splitlines()]
    assert layout.training_rows == len(train) and layout.validation_rows == len(val) and len(val) >= 1
    assert sorted(r["prompt"] for r in train + val) == sorted(r["prompt"] for r in ROWS)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert all(
        r["completion"].endswith("<|im_end|>") and not r["completion"].endswith("<|im_end|><|im_end|>") for r in train
    )
    again = write_sft_layout(src, tmp_path / "data2", validation_fraction=0.2)
    assert (tmp_path / "data2/validation.jsonl").read_text() == (tmp_path / "data/validation.jsonl").read_text()
    assert again.validation_rows == layout.validation_rows
    assert read_sft_layout(src, tmp_path / "data") == layout
    assert read_sft_layout(src, tmp_path / "data", max_tokens=4096) is None  # filtered for another length
    os.utime(src, ns=(1, 1))
    assert read_sft_layout(src, tmp_path / "data") is None  # stale after the source changes


def test_layout_drops_rows_longer_than_the_sequence(tmp_path):
    rows = ROWS[:4] + [{"prompt": "x " * 500, "completion": "[]<|im_end|>"}]
    src = _write_rows(tmp_path / "sft.jsonl", rows)
    layout = write_sft_layout(src, tmp_path / "d", count_tokens=lambda s: len(s.split()), max_tokens=100)
    assert layout.dropped_too_long == 1 and layout.training_rows + layout.validation_rows == 4


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"prompt": "p", "completion": "[]"}, "must end with '<|im_end|>'"),
        ({"prompt": "p", "completion": "[]<|im_end|><|im_end|>"}, "twice"),
        ({"prompt": "p", "completion": "[{]<|im_end|>"}, "not valid JSON"),
        ({"prompt": "p", "completion": '{"prefix": "a"}<|im_end|>'}, "JSON list"),
        ({"prompt": "", "completion": "[]<|im_end|>"}, "'prompt' must be a non-empty string"),
        ({"completion": "[]<|im_end|>"}, "'prompt'"),
    ],
)
def test_layout_rejects_bad_rows_naming_file_and_line(tmp_path, row, needle):
    src = _write_rows(tmp_path / "sft.jsonl", [ROWS[0], row])
    with pytest.raises(ValueError) as err:
        write_sft_layout(src, tmp_path / "d")
    assert f"{src}:2" in str(err.value) and needle in str(err.value)
    assert not (tmp_path / "d" / "layout.json").exists()
