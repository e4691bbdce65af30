"""Causal-LM training of the embedded default's base model on CPU: batching and the optimiser loop.

Plain PyTorch rather than a trainer library: a 0.4M-parameter model trains in
minutes only if nothing pads beyond the batch's longest sequence, so batches
are length-bucketed (:func:`_batches`) and the loss covers response tokens only
(:func:`collate`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Protocol

from freelm.demo.corpus import Example


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


def _batches(examples: list[Example], batch_tokens: int, rng: random.Random) -> list[list[Example]]:
    """Length-bucketed batches of about ``batch_tokens`` padded tokens, in random order."""
    ordered = sorted(examples, key=lambda e: len(e.ids))
    batches, current = [], []
    for ex in ordered:
        if current and len(ex.ids) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(ex)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


class Optimization(Protocol):
    """The settings training reads (a :class:`~freelm.demo.pretrain.PretrainConfig` has them all)."""

    seed: int
    steps: int
    batch_tokens: int  # padded tokens per batch
    lr: float
    warmup: int  # steps of linear warmup before the cosine decay
    weight_decay: float


def train_causal_lm(
    model, examples: list[Example], settings: Optimization, pad_id: int, log: Callable[[int, float], None] | None = None
) -> list[float]:
    """AdamW with linear warmup and cosine decay over length-bucketed batches; returns per-step losses."""
    import torch

    seed, steps, warmup = settings.seed, settings.steps, settings.warmup
    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    losses: list[float] = []
    batches: list[list[Example]] = []
    for step in range(steps):
        if not batches:
            batches = _batches(examples, settings.batch_tokens, rng)
        loss = model(**collate(batches.pop(), pad_id, model.device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log:
            log(step, losses[-1])
    model.eval()
    return losses
