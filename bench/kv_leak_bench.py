"""What the deleted lines leave in the kept KV on the embedded default, and what positions with gaps do.

After a cleaning of the counter task the kept text is the last complete line.
Here, at several points of each benchmark problem's exact solution, the lines
before the last are deleted and the model continues from the last line, four
ways that cross the two things eviction changes:

==========================  ===================  ========================
resumption                  the kept KV          positions
==========================  ===================  ========================
re-prefill (the reference)  fresh                contiguous
gaps, fresh KV              fresh                the originals (gaps)
evict-rerotate              kept, as computed    contiguous (re-rotated)
evict-gaps                  kept, as computed    the originals (gaps)
==========================  ===================  ========================

The two evictions run twice, once after the true lines and once after
counterfactual ones (the same labels, the values of another start value):
whatever differs between those two came through the KV. Printed per cut
point: how far the first next-token distribution moves (total variation:
from re-prefill's, and true vs counterfactual deleted lines), how often the
greedy continuation (``--tokens``) differs from re-prefill's and between true
and counterfactual lines, and how often it continues the solution exactly.

    python bench/kv_leak_bench.py [--problems 50] [--tokens 24] [--cuts 6,12,24,36]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "freelm" / "assets" / "embedded"
VARIANTS = ("re-prefill", "gaps, fresh KV", "evict-rerotate", "evict-gaps")


def prime(backend, ids: list[int], positions: list[int]) -> None:
    """The prefix cache holds exactly ``ids`` (all but the last token) computed from nothing at ``positions``."""
    import torch

    from freelm.backends.local_kv import CachedSequence, empty_cache, with_cache

    backend.flush_cache()
    cache = empty_cache(backend.model.config)
    with torch.inference_mode():
        backend.model(
            input_ids=torch.tensor([ids[:-1]]), position_ids=torch.tensor([positions[:-1]]), use_cache=True,
            **with_cache(cache),
        )  # fmt: skip
    sequence = CachedSequence(ids[:-1], cache, positions[:-1], positions[-1], ids[-1])
    backend.prefix_cache.keep(None, sequence)


def resume(backend, start, kept: list[int], eviction, tokens: int):
    """The first next-token probabilities and ``tokens`` greedy ids after ``kept``, from what ``start()`` cached."""
    import torch

    from freelm.backends.base import GenerateRequest, SamplingParams
    from freelm.backends.local_kv import with_cache

    start()
    taken = backend.prefix_cache.take(None, kept, eviction)
    with torch.inference_mode():
        logits = backend.model(
            input_ids=torch.tensor([kept[taken.reused :]]), position_ids=torch.tensor([taken.positions[taken.reused :]]),
            use_cache=True, **with_cache(taken.cache),
        ).logits[0, -1]  # fmt: skip
    start()
    request = GenerateRequest(
        max_new_tokens=tokens, input_ids=kept, sampling=SamplingParams.greedy(), eviction=eviction
    )
    return torch.softmax(logits.float(), -1), backend.generate_blocking(request).output_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens decoded after the kept line")
    parser.add_argument("--cuts", default="6,12,24,36", help="complete lines in the thinking when it is cleaned")
    parser.add_argument("--assets", type=Path, default=ASSETS)
    args = parser.parse_args()

    import torch

    from freelm.backends.base import Eviction
    from freelm.backends.local import LocalBackend
    from freelm.data import load_problems
    from freelm.demo.task import CounterProblem, continuation, line, parse_problem
    from freelm.prompts import render_reasoning_prompt

    torch.set_num_threads(1)
    backend = LocalBackend.from_pretrained(args.assets / "base")
    problems = [parse_problem(p.prompt) for p in load_problems(str(args.assets / "benchmark.jsonl"))][: args.problems]
    cuts = [int(c) for c in args.cuts.split(",")]

    def tv(a, b) -> float:
        return 0.5 * float((a - b).abs().sum())

    print(f"{len(problems)} problems, cleaned after {cuts} complete lines, {args.tokens} greedy tokens after")
    print(
        f"{'lines':>5s} {'resumption':15s} {'TV vs re-prefill':>16s} {'TV true/cf':>10s} "
        f"{'differs from re-prefill':>23s} {'differs true/cf':>15s} {'exact':>6s}"
    )
    for cut in cuts:
        rows: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
        for p in problems:
            if cut >= p.turns:
                continue
            other = CounterProblem(id="", start=(p.start + 50) % 100, turns=p.turns)
            prompt = backend.encode(render_reasoning_prompt(p.prompt, backend.tokenizer))
            last = backend.encode(line(p.turns - cut + 1, p.state(cut - 1))) + backend.encode("#")
            kept = prompt + last
            want = backend.encode(continuation(p, line(p.turns - cut + 1, p.state(cut - 1)) + "#"))[: args.tokens]
            bodies = [
                backend.encode("".join(line(q.turns - t, q.state(t)) for t in range(cut - 1))) for q in (p, other)
            ]
            gapped = list(range(len(prompt))) + list(
                range(len(prompt) + len(bodies[0]), len(prompt + bodies[0] + last))
            )
            outcomes = {
                "re-prefill": [resume(backend, backend.flush_cache, kept, None, args.tokens)],
                "gaps, fresh KV": [
                    resume(
                        backend, lambda kept=kept, gapped=gapped: prime(backend, kept, gapped), kept, None, args.tokens
                    )
                ],
            }
            for strategy in ("evict-rerotate", "evict-gaps"):
                outcomes[strategy] = []
                for body in bodies:
                    previous = prompt + body + last
                    eviction = Eviction(strategy, ((len(prompt), len(prompt) + len(body)),))

                    def start(previous=previous):
                        prime(backend, previous, list(range(len(previous))))

                    outcomes[strategy].append(resume(backend, start, kept, eviction, args.tokens))
            reference_probs, reference = outcomes["re-prefill"][0]
            for variant, runs in outcomes.items():
                (probs, out), row = runs[0], rows[variant]
                row.setdefault("tv_ref", []).append(tv(probs, reference_probs))
                row.setdefault("differs_ref", []).append(out != reference)
                row.setdefault("exact", []).append(out == want)
                if len(runs) == 2:
                    row.setdefault("tv_cf", []).append(tv(probs, runs[1][0]))
                    row.setdefault("differs_cf", []).append(out != runs[1][1])
        for variant, row in rows.items():
            leak = "tv_cf" in row
            print(
                f"{cut:5d} {variant:15s} {statistics.fmean(row['tv_ref']):16.3f} "
                f"{statistics.fmean(row['tv_cf']) if leak else 0:10.3f} "
                f"{100 * statistics.fmean(row['differs_ref']):22.0f}% "
                f"{100 * statistics.fmean(row['differs_cf']) if leak else 0:14.0f}% "
                f"{100 * statistics.fmean(row['exact']):5.0f}%"
            )


if __name__ == "__main__":
    main()
