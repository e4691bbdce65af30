"""Batched vs one-by-one decoding in the in-process backend, on the embedded default's model.

Decodes the same reasoning requests (benchmark prompts, greedy) once one by one
(``max_batch=1``, the reference) and once through ``generate`` with ``max_batch=N``
(concurrent requests decoded as one batch), checks the outputs are identical and
prints tokens/s and the speed ratio, for two workloads:

* best case: every request is a fresh prompt of the same length with the same
  budget (the benchmark prompts tokenize to equal lengths), so a batch has no
  padding and no row finishes early;
* mixed (what the loop sends): rollouts at different rounds, i.e. the prompt plus
  0 to ``--context`` tokens of the model's own earlier output, with budgets from
  a quarter of ``--tokens`` to all of it (a rollout's last chunk is shorter), so
  rows are left-padded to the longest and leave the batch at different steps.

Absolute times vary with machine load; each ratio is measured in the same run.

    python bench/local_batch_bench.py [--requests 64] [--batch 16] [--tokens 96] [--context 192]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "freelm" / "assets" / "embedded"


def compare(backend, requests, label: str, batch: int) -> None:
    """Time one-by-one (reference) and batched decoding of ``requests``; print both and the ratio."""
    started = time.perf_counter()
    reference = []
    for request in requests:
        backend.flush_cache()  # no KV reuse between different problems anyway; keep the reference honest
        reference.append(backend.generate_blocking(request))
    one_by_one = time.perf_counter() - started

    async def batched():
        return await asyncio.gather(*(backend.generate(r) for r in requests))

    started = time.perf_counter()
    results = asyncio.run(batched())
    together = time.perf_counter() - started

    tokens = sum(r.completion_tokens for r in reference)
    same = sum(a.output_ids == b.output_ids for a, b in zip(reference, results, strict=True))
    lengths = [len(r.input_ids) for r in requests]
    budgets = [r.max_new_tokens for r in requests]
    print(
        f"{label}: {len(requests)} requests, prompts {min(lengths)}-{max(lengths)} tokens, "
        f"budgets {min(budgets)}-{max(budgets)}, {tokens} tokens generated"
    )
    print(f"  one by one        : {one_by_one:6.2f} s  {tokens / one_by_one:7.0f} tok/s  (reference)")
    print(f"  batches of <= {batch:<3d}: {together:6.2f} s  {tokens / together:7.0f} tok/s")
    print(f"  speed-up: {one_by_one / together:.1f}x   identical outputs: {same}/{len(requests)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96, help="max_new_tokens per request (the mixed maximum)")
    parser.add_argument("--context", type=int, default=192, help="mixed: most earlier output tokens in a context")
    parser.add_argument("--assets", type=Path, default=ASSETS)
    args = parser.parse_args()

    import torch

    from freelm.backends.base import GenerateRequest, SamplingParams
    from freelm.backends.local import LocalBackend
    from freelm.data import load_problems
    from freelm.prompts import render_reasoning_prompt

    torch.set_num_threads(1)
    backend = LocalBackend.from_pretrained(args.assets / "base", max_batch=args.batch)
    problems = load_problems(str(args.assets / "benchmark.jsonl"))
    prompts = [
        backend.encode(render_reasoning_prompt(problems[i % len(problems)].prompt, backend.tokenizer))
        for i in range(args.requests)
    ]
    greedy = SamplingParams.greedy()
    best = [GenerateRequest(max_new_tokens=args.tokens, input_ids=ids, sampling=greedy) for ids in prompts]
    compare(backend, best, "best case (equal lengths, equal budgets)", args.batch)

    # the model's own thinking to continue from (not timed), then contexts cut at random points of it
    async def earlier_outputs():
        requests = [GenerateRequest(max_new_tokens=args.context, input_ids=ids, sampling=greedy) for ids in prompts]
        return await asyncio.gather(*(backend.generate(r) for r in requests))

    rng = random.Random(0)
    mixed = [
        GenerateRequest(
            max_new_tokens=rng.randint(max(1, args.tokens // 4), args.tokens),
            input_ids=ids + out.output_ids[: rng.randint(0, max(0, len(out.output_ids) - 2))],  # before any eos
            sampling=greedy,
        )
        for ids, out in zip(prompts, asyncio.run(earlier_outputs()), strict=True)
    ]
    compare(backend, mixed, "mixed (loop-like contexts and budgets)", args.batch)


if __name__ == "__main__":
    main()
