"""Batched vs one-by-one decoding in the in-process backend, on the embedded default's model.

Decodes the same reasoning requests (benchmark prompts, greedy) once one by one
(``max_batch=1``, the reference) and once through ``generate`` with ``max_batch=N``
(concurrent requests decoded as one batch), checks the outputs are identical and
prints tokens/s and the speed ratio. Absolute times vary with machine load; the
ratio is measured in the same run.

    python bench/local_batch_bench.py [--requests 64] [--batch 16] [--tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "freelm" / "assets" / "embedded"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96, help="max_new_tokens per request")
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
    requests = [
        GenerateRequest(
            max_new_tokens=args.tokens,
            input_ids=backend.encode(render_reasoning_prompt(problems[i % len(problems)].prompt, backend.tokenizer)),
            sampling=SamplingParams.greedy(),
        )
        for i in range(args.requests)
    ]

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
    print(f"{args.requests} requests x {args.tokens} new tokens (greedy), {tokens} tokens in all")
    print(f"one by one        : {one_by_one:6.2f} s  {tokens / one_by_one:7.0f} tok/s  (reference)")
    print(f"batches of <= {args.batch:<3d}: {together:6.2f} s  {tokens / together:7.0f} tok/s")
    print(f"speed-up: {one_by_one / together:.1f}x   identical outputs: {same}/{len(requests)}")


if __name__ == "__main__":
    main()
