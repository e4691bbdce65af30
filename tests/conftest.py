"""Shared fixtures: a tiny Qwen3 on disk, its tokenizer, an overfit "free" LoRA, and servers over them.

Everything is built from scratch in a session tmp dir (no downloads) with one
torch thread. torch is imported inside fixtures only, so torch-free test files
collect fast.

Reusable names:

* ``tiny_model_dir`` / ``tiny_tokenizer``: the checkpoint directory and its :class:`Tokenizer`.
* ``free_example``: the one cleaning prompt the adapter was overfit on and its target JSON.
* ``free_adapter_dir``: a PEFT adapter dir (saved as "default", load it under any name, e.g. "free")
  whose greedy output on ``free_example.prompt_ids`` is exactly ``free_example.target_ids``
  (target JSON + ``<|im_end|>``); with the adapter off the output differs.
* ``local_backend``: ``LocalBackend`` with the adapter loaded as "free" (session-wide; tests flush its cache).
* ``local_sglang_server``: an ``SGLangTestServer`` over ``local_backend``, counters/faults reset per test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

FREE_PROBLEM = "What is 12 + 30?"
FREE_THINKING = "First, compute the sum: 12 + 30 = 42. Wait, check again. 12 + 30 = 42. So the answer is 42."
FREE_TARGET = '[{"prefix": "Wait, check", "suffix": "again."}]'


@dataclass(frozen=True)
class CleaningExample:
    problem: str
    thinking: str
    prompt: str
    prompt_ids: list[int]
    target: str  # the JSON deletion list
    target_ids: list[int]  # target tokens + the eos token, what greedy decoding must emit


@pytest.fixture(scope="session")
def torch_one_thread():
    import torch

    torch.set_num_threads(1)
    return torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, torch_one_thread) -> Path:
    from freelm.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", corpus=[FREE_THINKING, FREE_TARGET])


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from freelm.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def free_example(tiny_tokenizer) -> CleaningExample:
    from freelm.prompts import render_cleaning_prompt
    from freelm.tinymodel import EOS_TOKEN

    prompt = render_cleaning_prompt(FREE_PROBLEM, FREE_THINKING)
    eos_id = tiny_tokenizer.hf.convert_tokens_to_ids(EOS_TOKEN)
    return CleaningExample(
        problem=FREE_PROBLEM,
        thinking=FREE_THINKING,
        prompt=prompt,
        prompt_ids=tiny_tokenizer.encode(prompt),
        target=FREE_TARGET,
        target_ids=tiny_tokenizer.encode(FREE_TARGET) + [eos_id],
    )


@pytest.fixture(scope="session")
def free_adapter_dir(tmp_path_factory, tiny_model_dir, free_example, torch_one_thread) -> Path:
    """Overfit a LoRA (r=16, all-linear, AdamW lr 1e-2) on the one example until greedy decoding reproduces it."""
    torch = torch_one_thread
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    ids = torch.tensor([free_example.prompt_ids + free_example.target_ids])
    labels = torch.tensor([[-100] * len(free_example.prompt_ids) + free_example.target_ids])
    target = labels[0, 1:]
    mask = target != -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def argmax_matches() -> bool:
        """Teacher-forced argmax == target everywhere <=> greedy decoding emits exactly the target."""
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        return bool((logits.argmax(-1)[mask] == target[mask]).all())

    for step in range(1, 101):
        model.train()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        if step >= 10 and step % 5 == 0 and argmax_matches():
            break
    else:
        pytest.fail(f"the LoRA did not overfit the cleaning example in 100 steps (loss {loss.item():.3f})")
    with model.disable_adapter():
        assert not argmax_matches(), "the base model already emits the target: adapter on/off would be untestable"
    out = tmp_path_factory.mktemp("adapter") / "free"
    model.save_pretrained(out)  # adapter_name "default": files at the top of ``out`` (apis.md §4)
    return out


@pytest.fixture(scope="session")
def local_backend(tiny_model_dir, free_adapter_dir, torch_one_thread):
    from freelm.backends.local import LocalBackend

    return LocalBackend.from_pretrained(tiny_model_dir, adapters={"free": free_adapter_dir}, threads=1)


@pytest.fixture(scope="session")
def _local_sglang_server_session(local_backend, tiny_model_dir):
    from freelm.testing.sglang_server import SGLangTestServer

    # served as scripts/serve_sglang.sh serves: --enable-cache-report (cached_tokens on the OpenAI route too)
    with SGLangTestServer(
        local_backend, served_model_name="tiny", model_path=str(tiny_model_dir), cache_report=True
    ) as server:
        yield server


@pytest.fixture
def local_sglang_server(_local_sglang_server_session, local_backend):
    """The session server with fresh counters, no queued faults and an empty KV cache."""
    _local_sglang_server_session.reset()
    local_backend.flush_cache()
    return _local_sglang_server_session
