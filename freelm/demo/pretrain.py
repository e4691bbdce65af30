"""Pretrain the embedded default's base model from scratch on CPU: a tiny Qwen3 that solves counter problems.

:class:`PretrainConfig` determines the base model (the build is a pure function
of it): the tokenizer (:func:`build_tokenizer`), the training sequences
(:mod:`freelm.demo.corpus`), the optimiser loop (:mod:`freelm.demo.lm_training`).
``python -m freelm.demo.pretrain`` also measures the result
(:mod:`freelm.demo.measure`): greedy accuracy from scratch (large context),
accuracy when resuming from pruned contexts, and batch-1 decoding speed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from freelm.demo.corpus import (
    CLEAN_EVERY_CHOICES,
    QUOTE_TEMPLATE,
    chat_examples,
    check_number_tokens,
    cleaning_states,
    make_examples,
    number_sheet,
    quote_command,
    tokenizer_corpus,
)
from freelm.demo.lm_training import train_causal_lm
from freelm.demo.task import generate_problems
from freelm.tinymodel import TinyConfig, new_tiny_qwen3
from freelm.tokenizer import Tokenizer

#: The base model's shape: ~0.4M parameters. 2 layers suffice because every step is a lookup of the most
#: recent token of a kind; d=128 learned the task in 1600 steps where d=64/96 were still erring at 800.
BASE_MODEL = TinyConfig(
    vocab_size=576,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=1024,
)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the base model (the build is a pure function of it)."""

    seed: int = 0
    model: TinyConfig = BASE_MODEL
    problems: int = 4000
    pruned_per_problem: int = 4
    start_windows: int = 3
    end_windows: int = 2
    pruned_window: int = 64
    quote_fraction: float = 0.125
    clean_every: tuple[int, ...] = CLEAN_EVERY_CHOICES
    min_turns: int = 40
    max_turns: int = 50
    steps: int = 2000
    batch_tokens: int = 4096
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    tokenizer_problems: int = 300


def build_tokenizer(config: PretrainConfig) -> Tokenizer:
    from freelm.tinymodel import train_tokenizer

    problems = generate_problems(
        config.tokenizer_problems, config.seed + 1, config.min_turns, config.max_turns, split="train"
    )
    corpus = tokenizer_corpus(problems) + number_sheet(config.max_turns)
    tokenizer = Tokenizer(train_tokenizer(corpus, vocab_size=config.model.vocab_size))
    check_number_tokens(tokenizer, config.max_turns)
    return tokenizer


def pretrain(config: PretrainConfig, out_dir: str | Path | None = None, log=None):
    """Tokenizer + base model trained from scratch; saved to ``out_dir`` when given. Returns (model, tokenizer, losses)."""
    tokenizer = build_tokenizer(config)
    problems = generate_problems(config.problems, config.seed + 2, config.min_turns, config.max_turns, split="train")
    examples = make_examples(
        problems,
        tokenizer,
        config.pruned_per_problem,
        config.pruned_window,
        config.seed + 3,
        config.start_windows,
        config.end_windows,
    )
    quoted = problems[: int(len(problems) * config.quote_fraction)]
    quoting = cleaning_states(quoted, tokenizer, config.clean_every, config.seed + 4)
    pairs = [(QUOTE_TEMPLATE.format(problem=p.prompt, thinking=t), quote_command(t)) for p, t in quoting]
    examples += chat_examples(pairs, tokenizer)
    model = new_tiny_qwen3(config.model, tokenizer.hf, config.seed)
    losses = train_causal_lm(model, examples, config, tokenizer.hf.pad_token_id, log)
    if out_dir is not None:
        out = Path(out_dir)
        model.save_pretrained(out)
        tokenizer.hf.save_pretrained(out)
        (out / "freelm_pretrain.json").write_text(json.dumps(asdict(config), indent=2))
    return model, tokenizer, losses


def main(argv: list[str] | None = None) -> None:
    import argparse

    import torch

    from freelm.demo.measure import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--lr", type=float, default=PretrainConfig.lr)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=BASE_MODEL.hidden_size)
    parser.add_argument("--layers", type=int, default=BASE_MODEL.num_hidden_layers)
    parser.add_argument("--intermediate", type=int, default=BASE_MODEL.intermediate_size)
    parser.add_argument("--batch-tokens", type=int, default=PretrainConfig.batch_tokens)
    parser.add_argument("--problems", type=int, default=PretrainConfig.problems)
    parser.add_argument("--head-dim", type=int, default=BASE_MODEL.head_dim)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = replace(
        BASE_MODEL,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        head_dim=args.head_dim,
    )
    config = replace(
        PretrainConfig(),
        model=shape,
        steps=args.steps,
        lr=args.lr,
        batch_tokens=args.batch_tokens,
        problems=args.problems,
    )
    started = time.perf_counter()

    def log(step: int, loss: float) -> None:
        if step % 25 == 0 or step == config.steps - 1:
            print(f"step {step:4d} loss {loss:.4f} {time.perf_counter() - started:6.1f}s", flush=True)

    model, tokenizer, _ = pretrain(config, args.out, log=log)
    print(f"trained in {time.perf_counter() - started:.1f}s", flush=True)
    test = generate_problems(args.eval_problems, config.seed + 1000, config.min_turns, config.max_turns, split="test")
    print(evaluate(model, tokenizer, test), flush=True)


if __name__ == "__main__":
    main()
