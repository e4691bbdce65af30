"""The PEFT trainer on the tiny Qwen3: masking, data order, loss going down, resume, a servable adapter."""

from __future__ import annotations

import json

import pytest

from freelm.free import Deletion
from freelm.records import append_jsonl, iter_jsonl
from freelm.training.sft_data import build_row
from freelm.training.trainer import (
    CHECKPOINT,
    Example,
    TrainConfig,
    collate,
    loss_tokens,
    split_eval,
    step_groups,
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


def test_collate_puts_loss_on_completion_tokens_only(torch_one_thread):
    examples = [Example([5, 6, 7, 8, 9], 3), Example([1, 2, 3], 1)]
    batch = collate(examples, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 2, 3, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert loss_tokens(examples) == 4


def test_data_order_is_resumable_and_covers_each_epoch():
    groups = step_groups(7, batch_size=2, grad_accum=2, seed=3, start_step=0)
    first = [next(groups) for _ in range(6)]  # 2 steps per epoch: 4 + 3 rows
    for epoch in range(3):
        rows = [i for step in first[2 * epoch : 2 * epoch + 2] for mb in step for i in mb]
        assert sorted(rows) == list(range(7))
    assert first[:2] != first[2:4]  # reshuffled per epoch
    resumed = step_groups(7, batch_size=2, grad_accum=2, seed=3, start_step=3)
    assert [next(resumed) for _ in range(3)] == first[3:]
    assert all(len(mb) <= 2 for step in first for mb in step)


def test_split_eval_keeps_a_training_row():
    assert split_eval(1, 0.5, 0) == ([0], [])
    train_idx, eval_idx = split_eval(10, 0.2, 0)
    assert len(eval_idx) == 2 and sorted(train_idx + eval_idx) == list(range(10))
    assert split_eval(10, 0.0, 0) == (list(range(10)), [])
    with pytest.raises(ValueError, match="eval_fraction"):
        TrainConfig(model="m", data="d", output_dir="o", eval_fraction=1.0)


def config(tiny_model_dir, data, out, **overrides) -> TrainConfig:
    settings = dict(
        model=str(tiny_model_dir), data=str(data), output_dir=str(out), rank=8, alpha=16, dropout=0.0, lr=1e-2,
        warmup_steps=2, batch_size=2, grad_accum=1, eval_fraction=0.2, eval_every=4, save_every=4, max_steps=12,
        progress=False,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def test_training_lowers_the_loss_and_saves_a_servable_adapter(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "sft.jsonl")
    result = train(config(tiny_model_dir, data, tmp_path / "out", target_modules=ALL_LINEAR))
    assert result.steps == 12 and result.train_examples == 4 and result.eval_examples == 2
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.5, result.losses  # nats per token
    assert [s for s, _ in result.eval_losses] == [4, 8, 12]
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]
    out = tmp_path / "out"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and not cfg["use_rslora"]
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    assert sorted(cfg["target_modules"]) == sorted(ALL_LINEAR)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "default").exists()
    log = [row for _, row in iter_jsonl(out / "train_log.jsonl")]
    assert [row["step"] for row in log] == list(range(1, 13)) and "eval_loss" in log[3]


def test_resume_continues_exactly_where_it_stopped(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import freelm.training.trainer as trainer

    data = write_rows(tmp_path / "sft.jsonl")
    settings = dict(max_steps=6, eval_every=5, save_every=2, dropout=0.1)
    straight = train(config(tiny_model_dir, data, tmp_path / "straight", **settings))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate", crash)  # dies at step 5, after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_model_dir, data, tmp_path / "resumed", **settings))
    monkeypatch.undo()
    assert (tmp_path / "resumed" / CHECKPOINT / "adapter_config.json").is_file()
    resumed = train(config(tiny_model_dir, data, tmp_path / "resumed", **settings))
    assert len(resumed.losses) == 2 and resumed.losses == pytest.approx(straight.losses[4:], rel=1e-5)
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)

    with pytest.raises(ValueError, match="different rank"):
        train(config(tiny_model_dir, data, tmp_path / "resumed", **settings, rank=4))


def test_kill_between_the_checkpoint_renames_resumes_from_the_previous_checkpoint(
    tiny_model_dir, tmp_path, monkeypatch
):
    from pathlib import Path

    data = write_rows(tmp_path / "sft.jsonl")
    settings = dict(max_steps=6, eval_every=5, save_every=2)
    straight = train(config(tiny_model_dir, data, tmp_path / "straight", **settings))

    real_rename = Path.rename

    def rename(self, target):
        if self.name == f"{CHECKPOINT}.tmp" and self.with_name(f"{CHECKPOINT}.old").exists():
            raise KeyboardInterrupt  # the step-4 save: step 2 moved aside, step 4 not yet in place
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_model_dir, data, tmp_path / "killed", **settings))
    monkeypatch.undo()
    assert not (tmp_path / "killed" / CHECKPOINT).exists()
    resumed = train(config(tiny_model_dir, data, tmp_path / "killed", **settings))
    assert len(resumed.losses) == 4 and resumed.losses == pytest.approx(straight.losses[2:], rel=1e-5)


def test_rows_too_long_for_max_length_are_dropped_with_a_clear_error(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "sft.jsonl")
    with pytest.raises(ValueError, match="no training row fits max_length=16"):
        train(config(tiny_model_dir, data, tmp_path / "out", max_length=16))
