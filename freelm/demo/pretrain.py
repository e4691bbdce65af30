"""Pretrain the embedded default's base model from scratch on CPU: a tiny Qwen3 that solves counter problems.

The model is trained on exactly what the loop will show it:

* full rollouts: the reasoning prompt (``render_reasoning_prompt``) followed by the
  whole solution and ``<|im_end|>``, loss on the response only;
* pruned rollouts: the same prompt followed by what is left of the thinking after
  the oracle cleaned it at a random point (the last complete line and the partial
  line after it), then the rest of the solution, loss on the rest only. Without
  these the model has never seen a thinking that starts at ``#17`` and would not
  resume correctly after a deletion.
* quoting: ``QUOTE_TEMPLATE`` with a thinking, answered by the JSON command that
  spans ALL its complete lines. A real base model knows JSON and can quote text;
  a model trained on counter lines alone never saw the JSON tokens, and a LoRA
  could not teach it them (measured: loss stuck at ~2.7, 0% exact after 300
  steps). With quoting in the base, the Free-Module LoRA only has to learn the
  policy: which lines are obsolete (all but the last complete one).

Token ids are built the way the loop builds them: prompt ids, then the
re-tokenized pruned thinking, then the ids the model generates next.

``evaluate`` measures greedy accuracy from scratch (large context), accuracy
when resuming from pruned contexts, and batch-1 decoding speed.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from freelm.demo.oracle import complete_lines, oracle_deletions, span_command
from freelm.demo.task import MODULUS, CounterProblem, generate_problems, solution
from freelm.free import apply_deletions, format_commands
from freelm.prompts import render_reasoning_prompt
from freelm.tinymodel import EOS_TOKEN, TinyConfig, new_tiny_qwen3
from freelm.tokenizer import Tokenizer

CLEAN_TEMPLATE = Path(__file__).with_name("clean_template.txt")
#: End windows cut within this many tokens before ``</think>`` (the last three lines).
END_SPAN = 12
#: Laid out like clean_template.txt (problem, then thinking), so that the skills it teaches (find the first
#: label after the problem, copy a line into JSON) transfer to the cleaning prompt as they are.
QUOTE_TEMPLATE = "<|im_start|>user\nQuote:\n{problem}\n{thinking}<|im_end|>\n<|im_start|>assistant\n"

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
class Example:
    ids: list[int]
    prompt_len: int  # tokens before the response (no loss on them)


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
    clean_every: tuple[int, ...] = (24, 32, 40, 48)
    min_turns: int = 40
    max_turns: int = 50
    steps: int = 2000
    batch_tokens: int = 4096
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    tokenizer_problems: int = 300


def tokenizer_corpus(problems: list[CounterProblem]) -> list[str]:
    """Every kind of text the model will read or write, so BPE merges make all of it compact."""
    from freelm.demo.oracle import oracle_output
    from freelm.prompts import render_cleaning_prompt

    corpus = []
    rng = random.Random(0)
    for p in problems:
        text = solution(p)
        corpus.append(render_reasoning_prompt(p.prompt) + text)
        thinking = text[: rng.randrange(1, text.index("</think>"))]
        corpus.append(render_cleaning_prompt(p.prompt, thinking, template=CLEAN_TEMPLATE) + oracle_output(thinking))
    return corpus


def number_sheet(max_turns: int, copies: int = 5) -> list[str]:
    """Every line ``#k v`` the task can produce, ``copies`` times: weight that makes BPE merge each number whole.

    From task text alone, BPE at this vocabulary size left 12 of the 100 values
    in two tokens (`` 45`` = `` 4`` + ``5``) and labels 49-50 in three. A
    split value is a different, harder step for the model (measured: the
    start values the committed-before-this base copied wrongly were exactly
    such values), so every value and label must be one token.
    """
    return [" ".join(f"#{k} {v}" for k in range(max_turns + 1) for v in range(MODULUS))] * copies


def check_number_tokens(tokenizer: Tokenizer, max_turns: int) -> None:
    """Raise when a counter value or a label is not a single token (the model's steps assume they are)."""
    split_values = [v for v in range(MODULUS) if len(tokenizer.encode(f" {v}")) != 1]
    split_labels = [k for k in range(max_turns + 1) if len(tokenizer.encode(f"#{k}")) != 2]
    if split_values or split_labels:
        raise ValueError(
            f"tokenizer splits counter values {split_values} / labels {split_labels} into several tokens: "
            "raise the vocabulary size or the number sheet's weight"
        )


def build_tokenizer(config: PretrainConfig) -> Tokenizer:
    from freelm.tinymodel import train_tokenizer

    problems = generate_problems(
        config.tokenizer_problems, config.seed + 1, config.min_turns, config.max_turns, split="train"
    )
    corpus = tokenizer_corpus(problems) + number_sheet(config.max_turns)
    tokenizer = Tokenizer(train_tokenizer(corpus, vocab_size=config.model.vocab_size))
    check_number_tokens(tokenizer, config.max_turns)
    return tokenizer


def make_examples(
    problems: list[CounterProblem],
    tokenizer: Tokenizer,
    pruned_per_problem: int,
    window: int,
    seed: int,
    start_windows: int = 1,
    end_windows: int = 0,
) -> list[Example]:
    """Per problem: the full sequence, then start, pruned and end windows (see the module docstring).

    A pruned sequence only needs to teach resuming, so it stops ``window`` tokens
    after the cut: further on it is the same as a full sequence, and shorter
    sequences make CPU training cheaper.

    Two steps happen once per solution and are copies, not the +37 step: the
    start value (from the prompt) and the boxed answer (from the ``#0`` line).
    A tiny model learns them last and, from pruned contexts, confuses them with
    the step (measured: one copy window per problem left the start copy wrong on
    3 of 4 problems in one seed, and the answer after a late cut was the last
    value + 37 on 4-10% of cuts near the end). So ``start_windows`` windows start
    at cut 0 and ``end_windows`` cut within the last ``END_SPAN`` tokens.
    """
    rng = random.Random(seed)
    eos = tokenizer.hf.convert_tokens_to_ids(EOS_TOKEN)
    examples = []
    for p in problems:
        prompt = tokenizer.encode(render_reasoning_prompt(p.prompt, tokenizer))
        text = solution(p)
        response = tokenizer.encode(text) + [eos]
        examples.append(Example(prompt + response, len(prompt)))
        think_end = len(tokenizer.encode(text.split("</think>")[0]))
        # up to and including think_end: a chunk can end right after the "#0" line, and then the model
        # must close the thinking and copy the answer from a context of that one line
        cuts = [0] * start_windows + [rng.randrange(1, think_end + 1) for _ in range(pruned_per_problem)]
        cuts += [rng.randrange(max(1, think_end - END_SPAN), think_end + 1) for _ in range(end_windows)]
        for cut in cuts:
            thinking = tokenizer.decode(response[:cut])
            kept = apply_deletions(thinking, oracle_deletions(thinking)).text
            context = prompt + tokenizer.encode(kept)
            examples.append(Example(context + response[cut : cut + window], len(context)))
    return examples


def cleaning_states(
    problems: list[CounterProblem],
    tokenizer: Tokenizer,
    clean_every: tuple[int, ...],
    seed: int,
    skip_rate: float = 0.0,
) -> list[tuple[CounterProblem, str]]:
    """The thinking texts a cleaner is shown when the oracle cleans every N tokens (N drawn from ``clean_every``).

    Each problem yields every round of one simulated rollout, plus one short
    thinking with fewer than two complete lines (the "nothing to delete" case).
    With ``skip_rate`` a round's deletion is dropped, as when a learned cleaner's
    command does not resolve: the next thinking is then longer than one interval,
    which a Free-Module must also handle.
    """
    rng = random.Random(seed)
    states = []
    for p in problems:
        every = rng.choice(clean_every)
        text = solution(p)
        response = tokenizer.encode(text)
        think_end = len(tokenizer.encode(text.split("</think>")[0]))
        kept: list[int] = []
        for pos in range(0, think_end - every, every):
            thinking = tokenizer.decode(kept + response[pos : pos + every])
            states.append((p, thinking))
            if rng.random() >= skip_rate:
                kept = tokenizer.encode(apply_deletions(thinking, oracle_deletions(thinking)).text)
            else:
                kept = tokenizer.encode(thinking)
        states.append((p, tokenizer.decode(response[: rng.randrange(1, 8)])))
    return states


def quote_command(thinking: str) -> str:
    """The JSON command spanning every complete line (``[]`` when there is none): the quoting skill."""
    lines = complete_lines(thinking)
    if not lines:
        return "[]"
    first_start, _, first_label = lines[0]
    return format_commands([span_command(thinking, first_start, first_label, lines[-1])])


def chat_examples(pairs: list[tuple[str, str]], tokenizer: Tokenizer) -> list[Example]:
    """(raw prompt, answer) pairs as sequences with the loss on the answer and the closing ``<|im_end|>``."""
    eos = tokenizer.hf.convert_tokens_to_ids(EOS_TOKEN)
    examples = []
    for prompt, answer in pairs:
        ids = tokenizer.encode(prompt)
        examples.append(Example(ids + tokenizer.encode(answer) + [eos], len(ids)))
    return examples


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


def train_causal_lm(
    model,
    examples: list[Example],
    *,
    steps: int,
    batch_tokens: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    seed: int,
    pad_id: int,
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW with linear warmup and cosine decay over length-bucketed batches; returns per-step losses."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    losses: list[float] = []
    batches: list[list[Example]] = []
    for step in range(steps):
        if not batches:
            batches = _batches(examples, batch_tokens, rng)
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
    losses = train_causal_lm(
        model,
        examples,
        steps=config.steps,
        batch_tokens=config.batch_tokens,
        lr=config.lr,
        warmup=config.warmup,
        weight_decay=config.weight_decay,
        seed=config.seed,
        pad_id=tokenizer.hf.pad_token_id,
        log=log,
    )
    if out_dir is not None:
        out = Path(out_dir)
        model.save_pretrained(out)
        tokenizer.hf.save_pretrained(out)
        (out / "freelm_pretrain.json").write_text(json.dumps(asdict(config), indent=2))
    return model, tokenizer, losses


# --------------------------------------------------------------------------- measuring


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


def main(argv: list[str] | None = None) -> None:
    import argparse

    import torch

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
