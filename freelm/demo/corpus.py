"""The embedded default's training texts: what the tiny base model reads and writes, as token sequences.

The base model is trained on exactly what the loop will show it
(:func:`make_examples`):

* full rollouts: the reasoning prompt (``render_reasoning_prompt``) followed by the
  whole solution and ``<|im_end|>``, loss on the response only;
* pruned rollouts: the same prompt followed by what is left of the thinking after
  the oracle cleaned it at a random point (the last complete line and the partial
  line after it), then the rest of the solution, loss on the rest only. Without
  these the model has never seen a thinking that starts at ``#17`` and would not
  resume correctly after a deletion.
* quoting (:func:`quote_command` on :func:`cleaning_states`): ``QUOTE_TEMPLATE``
  with a thinking, answered by the JSON command that spans ALL its complete
  lines. A real base model knows JSON and can quote text; a model trained on
  counter lines alone never saw the JSON tokens, and a LoRA could not teach it
  them (measured: loss stuck at ~2.7, 0% exact after 300 steps). With quoting
  in the base, the Free-Module LoRA only has to learn the policy: which lines
  are obsolete (all but the last complete one).

Token ids are built the way the loop builds them: prompt ids, then the
re-tokenized pruned thinking, then the ids the model generates next. The same
cleaning states, drawn at the loop's cleaning points, are the inputs of the
Free-Module's synthesis (``freelm.demo.build``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from freelm.cleaners.oracle import complete_lines, oracle_deletions, oracle_output, span_command
from freelm.demo.task import MODULUS, CounterProblem, solution
from freelm.free import apply_deletions, format_commands
from freelm.prompts import render_cleaning_prompt, render_reasoning_prompt
from freelm.schedule import CleaningSchedule
from freelm.tinymodel import EOS_TOKEN
from freelm.tokenizer import Tokenizer

CLEAN_TEMPLATE = Path(__file__).with_name("clean_template.txt")
#: The cleaning intervals the embedded default's data is drawn at, one per problem (the demo runs at 32):
#: a Free-Module trained on several sees thinking of several lengths.
CLEAN_EVERY_CHOICES = (24, 32, 40, 48)
#: End windows cut within this many tokens before ``</think>`` (the last three lines).
END_SPAN = 12
#: Laid out like clean_template.txt (problem, then thinking), so that the skills it teaches (find the first
#: label after the problem, copy a line into JSON) transfer to the cleaning prompt as they are.
QUOTE_TEMPLATE = "<|im_start|>user\nQuote:\n{problem}\n{thinking}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Example:
    ids: list[int]
    prompt_len: int  # tokens before the response (no loss on them)


def tokenizer_corpus(problems: list[CounterProblem]) -> list[str]:
    """Every kind of text the model will read or write, so BPE merges make all of it compact."""
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

    Each problem yields every round of one simulated rollout, at the loop's
    cleaning points (:mod:`freelm.schedule`) strictly inside the thinking (a
    boundary right before ``</think>`` is not drawn), plus one short thinking
    with fewer than two complete lines (the "nothing to delete" case).
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
        for n in CleaningSchedule(every).points(think_end):
            thinking = tokenizer.decode(kept + response[n - every : n])
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
