"""The first check on a new cluster (``scripts/smoke.sh``): served runs against in-process ones, token for token.

The script starts a server with the embedded default (real SGLang on a GPU,
real vLLM on a GPU or CPU, or the SGLang-protocol stand-in), runs ``runner.py``
against it and in process, then calls ``python -m freelm.smoke check`` to
compare the records and print one table line per question a researcher needs
answered before spending GPU hours. ``--engine`` says which client the checks
use (``sglang``: ``/generate``; ``vllm``: ``--backend vllm``) and how the prefix
cache counts (vLLM: whole KV blocks). ``python -m freelm.smoke serve`` is the
stand-in server the script starts with ``--server stand-in``: the embedded model
in :class:`~freelm.backends.local.LocalBackend` behind
:class:`~freelm.testing.sglang_server.SGLangTestServer`, served as the script
serves SGLang (deterministic inference, cache report, the same window).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from freelm.backends import make_backend
from freelm.backends.base import GenerateRequest, SamplingParams
from freelm.manifest import errors_path, manifest_path
from freelm.prompts import render_cleaning_prompt
from freelm.records import RolloutRecord, read_rollouts
from freelm.tokenizer import Tokenizer


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _by_key(path: Path) -> dict[tuple[str, str, int], RolloutRecord]:
    return {r.key: r for r in read_rollouts(path)} if path.exists() else {}


def first_difference(served: RolloutRecord, local: RolloutRecord, tokenizer: Tokenizer) -> str | None:
    """Where two rollouts of one problem part: the round, the token position in it, and both continuations."""
    for index, (a, b) in enumerate(zip(served.rounds, local.rounds)):
        if a.generated_text != b.generated_text:
            ids_a, ids_b = tokenizer.encode(a.generated_text), tokenizer.encode(b.generated_text)
            position = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
            head = tokenizer.decode(ids_a[:position])
            return (
                f"problem {served.id} rollout {served.rollout} round {index} token {position}: "
                f"served {a.generated_text[len(head) :][:60]!r} vs local {b.generated_text[len(head) :][:60]!r}"
            )
        decisions = [None if r.clean is None else (r.clean.raw_output, r.clean.deleted_spans) for r in (a, b)]
        if decisions[0] != decisions[1]:
            return (
                f"problem {served.id} rollout {served.rollout} round {index}: cleaning {decisions[0]} vs {decisions[1]}"
            )
    if len(served.rounds) != len(local.rounds) or served.response != local.response:
        return f"problem {served.id} rollout {served.rollout}: {len(served.rounds)} vs {len(local.rounds)} rounds"
    return None


def compare(name: str, served_path: Path, local_path: Path, tokenizer: Tokenizer) -> Check:
    served, local = _by_key(served_path), _by_key(local_path)
    if not served or set(served) != set(local):
        return Check(name, False, f"{len(served)} served vs {len(local)} local rollouts (see {served_path})")
    for key in sorted(served):
        where = first_difference(served[key], local[key], tokenizer)
        if where is not None:
            return Check(name, False, where)
    return Check(name, True, f"{len(served)}/{len(served)} responses and cleaning decisions identical")


def cache_hits(freelm_path: Path, block: int = 1) -> Check:
    """``cached_tokens`` of reasoning calls right after a deletion, against the ideal (the unchanged prefix).

    ``block``: the server counts cached tokens in whole KV blocks of this size (vLLM), so the ideal is rounded
    down to them.
    """
    hit = ideal = 0
    for record in _by_key(freelm_path).values():
        for before, after in zip(record.rounds, record.rounds[1:]):
            if before.clean is not None and before.clean.deleted_spans:
                ideal += min(after.reused_tokens, after.prompt_tokens - 1) // block * block
                hit += min(after.cached_tokens or 0, after.prompt_tokens - 1)
    if ideal == 0:
        return Check("prefix cache after deletions", False, "no deletion happened: nothing to measure")
    share = hit / ideal
    unit = f" (whole {block}-token blocks)" if block > 1 else ""
    return Check("prefix cache after deletions", share >= 0.9, f"{hit}/{ideal} ideal tokens hit{unit} ({share:.1%})")


def seeds(first: Path, second: Path, other: Path) -> Check:
    """The same seed twice gives the same rollouts, another seed other ones, and the manifest says seeds count."""
    a, b, c = _by_key(first), _by_key(second), _by_key(other)
    same = sum(1 for key in a if key in b and a[key].response == b[key].response)
    moved = sum(1 for key in a if key in c and a[key].response != c[key].response)
    honoured = json.loads(manifest_path(first).read_text()).get("seeds_honoured") if a else None
    ok = bool(a) and same == len(a) == len(b) and moved > 0 and honoured is True
    detail = f"seed 7 twice: {same}/{len(a)} identical; seed 8: {moved}/{len(a)} differ; manifest {honoured}"
    return Check("seeds honoured", ok, detail)


#: how each engine is asked for the base model's answer (the endpoint the smoke runs went to)
ENGINES = {"sglang": ("sglang", ""), "vllm": ("vllm", "/v1")}


async def _base_answer(url: str, engine: str, prompt: str, max_new_tokens: int) -> str:
    kind, path = ENGINES[engine]
    backend = make_backend(kind, base_url=url + path, max_retries=0)
    try:
        request = GenerateRequest(max_new_tokens, text=prompt, sampling=SamplingParams.greedy())
        return (await backend.generate(request)).text
    finally:
        await backend.aclose()


def adapter_applied(freelm_path: Path, url: str, template: Path | None, engine: str = "sglang") -> Check:
    """The cleaner's answer on its own prompt differs from the base model's answer to the same prompt."""
    for record in _by_key(freelm_path).values():
        for rnd, thinking in record.replay():
            if rnd.clean is not None and rnd.clean.raw_output is not None:
                prompt = render_cleaning_prompt(record.prompt or "", thinking, template)
                base = asyncio.run(_base_answer(url, engine, prompt, rnd.clean.max_new_tokens or 64))
                ok = base != rnd.clean.raw_output
                detail = f"adapter {rnd.clean.raw_output[:40]!r} vs base {base[:40]!r}"
                return Check("adapter applied", ok, detail)
    return Check("adapter applied", False, "no cleaning call in the Free()LM run")


def isolation(freelm_path: Path) -> Check:
    """The runner's adapter isolation probe (freelm/backends/isolation.py), as the Free()LM run's manifest records it."""
    manifest = manifest_path(freelm_path)
    if not manifest.exists() or not freelm_path.exists():
        return Check("adapter isolation", False, "the Free()LM run did not start (see runs.log: a leak refuses it)")
    reports = (json.loads(manifest.read_text()).get("served") or {}).get("isolation") or {}
    if not reports:
        return Check("adapter isolation", False, "no probe recorded (run without --skip-isolation-check)")
    bad = [r for r in reports.values() if r.get("verdict") != "isolated"]
    first = (bad or list(reports.values()))[0]
    detail = f"{len(reports) - len(bad)}/{len(reports)} servers isolated; {first.get('leaked')} base answers changed"
    return Check("adapter isolation", not bad, f"{detail} beside adapter {first.get('adapter')!r} ({first['verdict']})")


def window_edge(path: Path, window: int) -> Check:
    records = _by_key(path)
    finishes: dict[str, int] = {}
    for record in records.values():
        finishes[record.finish_reason] = finishes.get(record.finish_reason, 0) + 1
    errors = errors_path(path)
    lost = sum(1 for _ in errors.open()) if errors.exists() else 0
    ok = bool(records) and lost == 0 and set(finishes) <= {"context_overflow", "length", "stop"}
    return Check("window edge", ok, f"--max-tokens {window} = window: {len(records)} kept, {lost} lost, {finishes}")


def check(args: argparse.Namespace) -> int:
    out: Path = args.out
    tokenizer = Tokenizer.from_pretrained(args.model)
    results = [
        compare("greedy vanilla = in-process", out / "served.vanilla.jsonl", out / "local.vanilla.jsonl", tokenizer),
        compare("greedy Free()LM = in-process", out / "served.freelm.jsonl", out / "local.freelm.jsonl", tokenizer),
        cache_hits(out / "served.freelm.jsonl", args.cache_block),
        seeds(out / "seeded.1.jsonl", out / "seeded.2.jsonl", out / "seeded.other.jsonl"),
        adapter_applied(out / "served.freelm.jsonl", args.url, args.clean_template, args.engine),
        isolation(out / "served.freelm.jsonl"),
        window_edge(out / "window.jsonl", args.window),
    ]
    width = max(len(r.name) for r in results)
    print(f"{'check':<{width}}  result  detail")
    for r in results:
        print(f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.detail}")
    return 0 if all(r.ok for r in results) else 1


def serve(args: argparse.Namespace) -> int:
    """The stand-in, served as the smoke script serves SGLang; prints its URL (a free port), runs until killed."""
    import torch

    from freelm.backends.local import LocalBackend
    from freelm.testing.sglang_server import SGLangTestServer

    torch.set_num_threads(1)
    backend = LocalBackend.from_pretrained(args.model, adapters={"free": args.adapter}, threads=1)
    server = SGLangTestServer(
        backend, served_model_name="embedded", model_path=str(args.model), context_length=args.window,
        deterministic=True, cache_report=True,
    )  # fmt: skip
    server.start()
    print(server.url, flush=True)
    while True:
        time.sleep(3600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freelm.smoke", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="compare the smoke runs in OUT and print the table")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="the embedded base model (its tokenizer)")
    p.add_argument("--url", required=True, help="the server the runs went to")
    p.add_argument("--window", type=int, required=True)
    p.add_argument("--clean-template", type=Path, default=None)
    p.add_argument("--engine", choices=sorted(ENGINES), default="sglang", help="the engine the runs went to")
    p.add_argument("--cache-block", type=int, default=1, help="tokens per KV block in cached_tokens (vLLM: its block)")
    p = sub.add_parser("serve", help="the SGLang-protocol stand-in over the embedded model")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--window", type=int, required=True)
    args = parser.parse_args(argv)
    return check(args) if args.command == "check" else serve(args)


if __name__ == "__main__":
    sys.exit(main())
