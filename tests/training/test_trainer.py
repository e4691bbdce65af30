"""The TRL trainer on the tiny Qwen3: the completion-only mask, loss going down, resume, a servable adapter."""

from __future__ import annotations

import json
import shutil

import pytest

from freelm.free import Deletion
from freelm.jsonl import append_jsonl, iter_jsonl
from freelm.training.sft_data import build_row
from freelm.training.trainer import (
    CONFIG_FILE,
    TrainConfig,
    last_complete_checkpoint,
    split_eval,
    tokenize_rows,
    train,
)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
THINKINGS = [
    ("What is 12 + 30?", "First, 12 + 30 = 42. Wait, check again. 12 + 30 = 42. So 42.", "Wait, check", "again."),
    ("What is 7 * 6?", "Try 7 * 6 = 43. No, that is wrong. 7 * 6 = 42. Done.", "Try 7", "wrong."),
    ("What is 50 - 8?", "50 - 8 = 42. Let me verify: 42 + 8 = 50. Yes. Answer 42.", "Let me", "Yes."),
    ("What is 84 / 2?", "Half of 84. Maybe 40? No. 84 / 2 = 42. The answer is 42.", "Maybe", "No."),
    ("What is 6 * 7?", "6 * 7 = 42. Double check: 7 * 6 = 42. Fine. So 42.", "Double", "Fine."),
    ("What is 40 + 2?", "40 + 2 = 42. Nothing to drop here. The answer is 42.", None, None),
]


def write_rows(path, thinkings=THINKINGS):
    with path.open("w") as f:
        for i, (problem, thinking, prefix, suffix) in enumerate(thinkings):
            deletions = [Deletion(prefix, suffix)] if prefix else []
            append_jsonl(f, build_row(problem, thinking, deletions, id=str(i)))
    return path


def config(tiny_model_dir, data, out, **overrides) -> TrainConfig:
    settings = dict(
        model=str(tiny_model_dir), data=str(data), output_dir=str(out), rank=8, alpha=16, dropout=0.0, lr=1e-2,
        warmup_steps=2, batch_size=2, grad_accum=1, eval_fraction=0.2, eval_every=4, save_every=4, max_steps=12,
        progress=False, device="cpu",
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def test_completion_only_loss_masks_exactly_the_prompt_tokens(tiny_model_dir, tiny_tokenizer, torch_one_thread):
    """TRL's labels from our (input_ids, completion_mask) equal a hand computation of the completion-token loss."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [build_row(p, t, [Deletion(a, b)] if a else [], id=str(i)) for i, (p, t, a, b) in enumerate(THINKINGS[:2])]
    examples, dropped = tokenize_rows(rows, tiny_tokenizer, max_length=4096)
    assert dropped == 0
    for row, ex in zip(rows, examples):
        prompt_ids = tiny_tokenizer.encode(row["prompt"])  # what the server tokenizes at inference
        assert ex["input_ids"][: len(prompt_ids)] == prompt_ids
        assert ex["input_ids"][len(prompt_ids) :] == tiny_tokenizer.encode(row["completion"])
        assert ex["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(ex["input_ids"]) - len(prompt_ids))

    labelled = [  # what SFTTrainer's build_labels does with completion_only_loss=True
        {
            "input_ids": ex["input_ids"],
            "labels": [t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"])],
        }
        for ex in examples
    ]
    batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.hf.pad_token_id)(labelled)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        loss = float(model(**batch).loss)
        total, count = 0.0, 0
        for row, ex in zip(rows, examples):  # by hand: -log p(completion token | everything before it)
            n_prompt = len(tiny_tokenizer.encode(row["prompt"]))
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].log_softmax(-1)
            for pos in range(n_prompt, len(ex["input_ids"])):
                total -= float(logits[pos - 1, ex["input_ids"][pos]])
                count += 1
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_split_eval_keeps_a_training_row():
    assert split_eval(1, 0.5, 0) == ([0], [])
    train_idx, eval_idx = split_eval(10, 0.2, 0)
    assert len(eval_idx) == 2 and sorted(train_idx + eval_idx) == list(range(10))
    assert split_eval(10, 0.0, 0) == (list(range(10)), [])
    with pytest.raises(ValueError, match="eval_fraction"):
        TrainConfig(model="m", data="d", output_dir="o", eval_fraction=1.0)
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(model="m", data="d", output_dir="o", report_to="mlflow")


def test_training_lowers_the_loss_and_saves_a_servable_adapter(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "sft.jsonl")
    result = train(config(tiny_model_dir, data, tmp_path / "out", target_modules=ALL_LINEAR))
    assert result.steps == 12 and result.train_examples == 4 and result.eval_examples == 2
    assert len(result.losses) == 12
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.5, result.losses  # nats per token
    assert [s for s, _ in result.eval_losses] == [4, 8, 12]
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]
    out = tmp_path / "out"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and not cfg["use_rslora"]
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    assert sorted(cfg["target_modules"]) == sorted(ALL_LINEAR)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "default").exists()
    assert json.loads((out / CONFIG_FILE).read_text())["rank"] == 8  # the settings are recorded
    log = [row for _, row in iter_jsonl(out / "train_log.jsonl")]
    assert [row["step"] for row in log if "loss" in row] == list(range(1, 13))
    assert [row["step"] for row in log if "eval_loss" in row] == [4, 8, 12]


def test_resume_continues_where_it_stopped_and_refuses_a_changed_recipe(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_rows(tmp_path / "sft.jsonl")
    settings = dict(max_steps=6, eval_every=5, save_every=2, dropout=0.1, target_modules=ALL_LINEAR)
    straight = train(config(tiny_model_dir, data, tmp_path / "straight", **settings))

    # A run killed after step 5: its newest complete checkpoint is step 4, and step 6's save was half-written.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    (resumed_dir / "checkpoint-6" / "trainer_state.json").unlink()
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_log.jsonl"):
        (resumed_dir / name).unlink()
    assert last_complete_checkpoint(resumed_dir).name == "checkpoint-4"
    resumed = train(config(tiny_model_dir, data, resumed_dir, **settings))
    assert resumed.steps == 6 and len(resumed.losses) == 2
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(resumed_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)

    with pytest.raises(ValueError, match="different rank"):
        train(config(tiny_model_dir, data, resumed_dir, **{**settings, "rank": 4}))


def test_rows_too_long_for_max_length_are_dropped_with_a_clear_error(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "sft.jsonl")
    with pytest.raises(ValueError, match="no training row fits max_length=16"):
        train(config(tiny_model_dir, data, tmp_path / "out", max_length=16))


@pytest.mark.slow
def test_two_cpu_processes_under_torchrun_train_the_same_adapter(tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): DDP through transformers/accelerate, one servable adapter."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors import safe_open

    from freelm.training.adapter_check import check_sglang_adapter

    data = write_rows(tmp_path / "sft.jsonl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "freelm.cli", "train", "--model", str(tiny_model_dir), "--data", str(data),
        "--output-dir", str(out), "--device", "cpu", "--max-steps", "6", "--batch-size", "1", "--grad-accum", "1",
        "--rank", "8", "--alpha", "16", "--dropout", "0", "--lr", "1e-2", "--eval-fraction", "0.2", "--eval-every",
        "3", "--save-every", "3", "--target-modules", *ALL_LINEAR, "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    base_config = json.loads((tiny_model_dir / "config.json").read_text())
    assert check_sglang_adapter(out, base_config) == []
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == sorted(ALL_LINEAR)
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    expected = {
        f"base_model.model.model.layers.{layer}.{'self_attn' if m in ALL_LINEAR[:4] else 'mlp'}.{m}.lora_{ab}.weight"
        for layer in range(base_config["num_hidden_layers"])
        for m in ALL_LINEAR
        for ab in "AB"
    }
    assert names == expected
    log = [row for _, row in iter_jsonl(out / "train_log.jsonl")]
    steps = [row for row in log if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, 7))  # rank 0 logs once per step
    assert steps[1]["epoch"] == pytest.approx(1.0)  # 4 rows = 2 steps of 1 row on each of 2 processes
