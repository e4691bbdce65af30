"""Gradient accumulation is only a memory trade: k micro-batches of one row train exactly as one batch of k rows.

Written against the public entry point (``train(TrainConfig)``) and the saved
adapter, not the loop's internals, so it holds for any implementation of the
trainer. Rows have completions of very different lengths: a loss averaged per
micro-batch (instead of over the step's completion tokens) weighs a short row
like a long one and fails here.
"""

from __future__ import annotations

import json

import pytest

from freelm.free import Deletion
from freelm.jsonl import append_jsonl
from freelm.training.sft_data import build_row
from freelm.training.trainer import TrainConfig, train

THINKING = "First, 12 + 30 = 42. Wait, check again. 12 + 30 = 42. Maybe 43? No. So the answer is 42."
DELETIONS = [
    [],
    [Deletion("Wait, check", "again.")],
    [Deletion("Wait, check", "again."), Deletion("Maybe 43?", "No.")],
    [Deletion("First,", "42."), Deletion("Wait, check", "again."), Deletion("Maybe 43?", "No. So the answer")],
]


def run(tiny_model_dir, tmp_path, name: str, batch_size: int, grad_accum: int):
    data = tmp_path / "rows.jsonl"
    if not data.exists():
        with data.open("w") as f:
            for i, deletions in enumerate(DELETIONS):
                append_jsonl(f, build_row("What is 12 + 30?", THINKING, deletions, id=str(i)))
    config = TrainConfig(
        model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / name), eval_fraction=0.0,
        rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"), lr=1e-2, scheduler="constant",
        max_steps=2, batch_size=batch_size, grad_accum=grad_accum, max_length=4096, seed=0, progress=False,
        max_grad_norm=0.0, device="cpu", dtype="float32",
    )  # fmt: skip
    result = train(config)
    return result, tmp_path / name


def adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_accumulated_micro_batches_train_like_one_full_batch(tiny_model_dir, tmp_path, torch_one_thread):
    full, full_dir = run(tiny_model_dir, tmp_path, "full", batch_size=4, grad_accum=1)
    accum, accum_dir = run(tiny_model_dir, tmp_path, "accum", batch_size=1, grad_accum=4)
    lengths = {len(json.dumps([d.to_dict() for d in ds])) for ds in DELETIONS}
    assert len(lengths) == len(DELETIONS)  # completions of different lengths: the weighting matters
    # step 1's loss is the same mean over the same tokens; step 2 follows the same update
    assert accum.losses == pytest.approx(full.losses, rel=1e-4)
    a, b = adapter_tensors(full_dir), adapter_tensors(accum_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch_one_thread.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
