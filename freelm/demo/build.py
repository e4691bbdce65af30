"""Build the embedded default: base model, Free-Module data, Free-Module LoRA, benchmark.

    python -m freelm.demo.build --out freelm/assets/embedded

Every step uses the project's real code paths, so the small model exercises
exactly what a Qwen3-8B run does:

1. ``base/``: a tiny Qwen3 and its byte-level tokenizer trained from scratch on
   the counter task (``freelm.demo.pretrain``).
2. ``sft.jsonl``: Free-Module training data from ``freelm.training.synth``: the
   thinking texts a cleaner sees in the loop (``freelm.demo.corpus.cleaning_states``:
   the oracle cleans every N tokens, and a share of rounds is dropped, as when a
   learned cleaner's command does not resolve), deletions from the registry's
   ``oracle`` cleaner as teacher, kept only when the REWARD FILTER (base-model
   continuations from the pruned and the unpruned thinking, graded by the
   evaluation grader) shows they do not hurt.
3. ``free/``: the Free-Module LoRA trained on those rows by ``freelm.training.trainer``
   (TRL's SFTTrainer + PEFT, on the CPU) and checked for SGLang compatibility.
4. ``benchmark.jsonl``: held-out problems: only (start, turns) pairs that no training set draws (``task.held_out``).

Each step is skipped when its output already exists (the build resumes), and
``build.json`` records every setting and timing. Deterministic for a given seed
and thread count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from freelm.demo.corpus import CLEAN_EVERY_CHOICES, CLEAN_TEMPLATE, cleaning_states
from freelm.demo.pretrain import PretrainConfig
from freelm.demo.task import generate_problems

#: The Free-Module's LoRA (all seven projections: on a 0.4M-parameter model attention alone learns too slowly).
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    pretrain_steps: int = 1400
    synth_problems: int = 192
    synth_clean_every: tuple[int, ...] = CLEAN_EVERY_CHOICES
    synth_skip_rate: float = 0.25
    reward_k: int = 1
    synth_batch: int = 16  # cuts decided at once; their reward-filter continuations are decoded as one batch
    reward_max_tokens: int = 512  # enough for any continuation of a 50-turn solution
    lora_steps: int = 1200
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_lr: float = 1e-2
    lora_batch: int = 16
    benchmark_problems: int = 100
    benchmark_seed: int = 2024
    threads: int = 2


def _write_benchmark(path: Path, config: BuildConfig) -> None:
    from freelm.jsonl import write_jsonl

    rows = [p.to_row() for p in generate_problems(config.benchmark_problems, config.benchmark_seed, split="test")]
    write_jsonl(path, rows)


def _synthesize(out: Path, config: BuildConfig) -> dict:
    """Oracle teacher + reward filter over the cleaning states of the synthesis problems."""
    from freelm.backends import make_backend
    from freelm.backends.base import SamplingParams
    from freelm.cleaners.registry import get_cleaner
    from freelm.data import Problem
    from freelm.evaluation.grade import GraderPool
    from freelm.jsonl import iter_jsonl, write_jsonl
    from freelm.loop import LoopConfig
    from freelm.training.cuts import Cut
    from freelm.training.reward import AnswerGrader, RewardFilter
    from freelm.training.synth import Synthesizer
    from freelm.training.teachers import CleanerTeacher

    backend = make_backend("local", model_dir=out / "base", max_batch=config.synth_batch)
    tokenizer = backend.tokenizer
    problems = generate_problems(config.synth_problems, config.seed + 7, split="train")
    states = cleaning_states(problems, tokenizer, config.synth_clean_every, config.seed + 8, config.synth_skip_rate)
    cuts, seen = [], {}
    for problem, thinking in states:
        index = seen[problem.id] = seen.get(problem.id, -1) + 1
        cuts.append(Cut(Problem(**problem.to_row()), rollout=0, cut_tokens=index, thinking=thinking))
    continuation = LoopConfig(
        clean_every=10**6, max_tokens=config.reward_max_tokens, context_limit=1024, sampling=SamplingParams.greedy()
    )
    with GraderPool(1) as pool:
        synthesizer = Synthesizer(
            teacher=CleanerTeacher(get_cleaner("oracle").cls()),
            reward=RewardFilter(backend, tokenizer, AnswerGrader(pool), k=config.reward_k, loop=continuation),
            output=out / "sft.jsonl",
            log=out / "sft.synth.jsonl",
            template=CLEAN_TEMPLATE,
            keep_empty=1.0,
            concurrency=config.synth_batch,
        )
        summary = asyncio.run(synthesizer.run(cuts, progress=True))
    for path in (out / "sft.jsonl", out / "sft.synth.jsonl"):  # completion order -> cut order: same file every build
        rows = [row for _, row in iter_jsonl(path)]
        write_jsonl(path, sorted(rows, key=lambda r: (r["id"], r["rollout"], r["cut_tokens"])))
    return summary.to_dict()


def _train_lora(out: Path, config: BuildConfig) -> dict:
    from freelm.training.trainer import TrainConfig, train

    result = train(
        TrainConfig(
            model=str(out / "base"), data=str(out / "sft.jsonl"), output_dir=str(out / "lora-run"),
            rank=config.lora_rank, alpha=config.lora_alpha, dropout=0.0, target_modules=ALL_LINEAR,
            lr=config.lora_lr, scheduler="cosine", warmup_steps=20, max_steps=config.lora_steps,
            batch_size=config.lora_batch, grad_accum=1, max_length=512, seed=config.seed,
            eval_fraction=0.05, eval_every=200, save_every=200, device="cpu",
        )
    )  # fmt: skip
    return {"steps": result.steps, "train_examples": result.train_examples, "eval_losses": result.eval_losses,
            "first_loss": result.losses[0] if result.losses else None,
            "last_loss": result.losses[-1] if result.losses else None, "adapter_dir": str(result.adapter_dir)}  # fmt: skip


def build(out: Path, config: BuildConfig) -> dict:
    import torch

    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "build.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record["config"] = asdict(config)
    timings = record.setdefault("seconds", {})

    def step(name: str, done: bool, fn) -> None:
        if done:
            print(f"[build] {name}: already built, skipped", flush=True)
            return
        print(f"[build] {name} ...", flush=True)
        started = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - started, 1)
        if result is not None:
            record[name] = result
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"[build] {name}: {timings[name]} s", flush=True)

    def pretrain_base():
        from freelm.demo.pretrain import pretrain

        def log(i: int, loss: float) -> None:
            if i % 200 == 0:
                print(f"  pretrain step {i} loss {loss:.4f}", flush=True)

        _, _, losses = pretrain(
            replace(PretrainConfig(), seed=config.seed, steps=config.pretrain_steps), out / "base", log
        )
        return {"first_loss": losses[0], "last_loss": losses[-1]}

    step("pretrain", (out / "base" / "model.safetensors").exists(), pretrain_base)
    step("synthesize", (out / "sft.synth.jsonl").exists() and "synthesize" in record, lambda: _synthesize(out, config))
    step("train_lora", (out / "free" / "adapter_config.json").exists(), lambda: _install_adapter(out, config))
    step("benchmark", (out / "benchmark.jsonl").exists(), lambda: _write_benchmark(out / "benchmark.jsonl", config))
    return record


def _install_adapter(out: Path, config: BuildConfig) -> dict:
    """Train, then keep only the servable adapter and its records (checkpoints and the tokenizer copy are scratch)."""
    summary = _train_lora(out, config)
    keep = ("adapter_config.json", "adapter_model.safetensors", "README.md", "train_config.json", "train_log.jsonl")
    (out / "free").mkdir()
    for name in keep:
        shutil.copy2(Path(summary["adapter_dir"]) / name, out / "free" / name)
    shutil.rmtree(out / "lora-run")
    summary["adapter_dir"] = "free"
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (resumable)")
    parser.add_argument("--quick", action="store_true", help="a shortened build for tests: a few steps each")
    parser.add_argument("--threads", type=int, default=BuildConfig.threads)
    parser.add_argument("--seed", type=int, default=BuildConfig.seed, help="another seed: a robustness check")
    args = parser.parse_args(argv)
    config = BuildConfig(threads=args.threads, seed=args.seed)
    if args.quick:
        config = replace(
            config, pretrain_steps=3, synth_problems=2, reward_max_tokens=8, lora_steps=3, benchmark_problems=4
        )
    started = time.perf_counter()
    record = build(args.out, config)
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2))
    print(f"[build] done in {time.perf_counter() - started:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
