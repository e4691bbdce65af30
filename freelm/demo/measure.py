"""Measuring the embedded default's base model: greedy accuracy from scratch and after a deletion, decode speed."""

from __future__ import annotations

import random
import time

from freelm.cleaners.oracle import oracle_deletions
from freelm.demo.task import CounterProblem, solution
from freelm.free import apply_deletions
from freelm.prompts import render_reasoning_prompt
from freelm.tokenizer import Tokenizer


def greedy_continue(model, tokenizer: Tokenizer, contexts: list[list[int]], max_new_tokens: int, batch_size: int = 32):
    """Greedy continuations (token ids) of several contexts, batched with left padding."""
    import torch

    pad_id = tokenizer.hf.pad_token_id
    outputs: list[list[int]] = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
        for row in out[:, width:].tolist():
            if model.generation_config.eos_token_id in row:
                row = row[: row.index(model.generation_config.eos_token_id) + 1]
            outputs.append([t for t in row if t != pad_id])
    return outputs


def evaluate(model, tokenizer: Tokenizer, problems: list[CounterProblem], seed: int = 0) -> dict[str, float]:
    """Exact-match accuracy from scratch and from one oracle-pruned point, plus batch-1 decode speed."""
    import torch

    rng = random.Random(seed)
    prompts = [tokenizer.encode(render_reasoning_prompt(p.prompt, tokenizer)) for p in problems]
    longest = max(len(tokenizer.encode(solution(p))) for p in problems) + 8
    full = greedy_continue(model, tokenizer, prompts, longest)
    full_ok = [tokenizer.decode(o).startswith(solution(p)) for o, p in zip(full, problems, strict=True)]

    pruned_contexts, remainders = [], []
    for p, prompt in zip(problems, prompts, strict=True):
        response = tokenizer.encode(solution(p))
        cut = rng.randrange(1, len(tokenizer.encode(solution(p).split("</think>")[0])) + 1)
        thinking = tokenizer.decode(response[:cut])
        kept = apply_deletions(thinking, oracle_deletions(thinking)).text
        pruned_contexts.append(prompt + tokenizer.encode(kept))
        remainders.append(tokenizer.decode(response[cut:]))
    resumed = greedy_continue(model, tokenizer, pruned_contexts, longest)
    pruned_ok = [tokenizer.decode(o).startswith(r) for o, r in zip(resumed, remainders, strict=True)]

    one = torch.tensor([prompts[0]])
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=one, max_new_tokens=longest, do_sample=False)
    seconds = time.perf_counter() - started
    return {
        "full_accuracy": sum(full_ok) / len(problems),
        "pruned_accuracy": sum(pruned_ok) / len(problems),
        "decode_tokens_per_s_batch1": (out.shape[1] - one.shape[1]) / seconds,
    }
