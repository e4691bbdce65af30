"""A shortened pretraining run of the embedded default's base model: it trains, and the loss goes down."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from freelm.demo.corpus import Example, make_examples  # noqa: E402
from freelm.demo.lm_training import collate  # noqa: E402
from freelm.demo.pretrain import PretrainConfig, pretrain  # noqa: E402
from freelm.demo.task import generate_problems  # noqa: E402
from freelm.tinymodel import TinyConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


SMALL = PretrainConfig(
    model=TinyConfig(
        vocab_size=576, hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8, num_attention_heads=4
    ),
    problems=24,
    tokenizer_problems=20,
    min_turns=3,
    max_turns=6,
    steps=12,
    batch_tokens=1024,
    lr=1e-2,
    warmup=2,
)


def test_every_counter_value_and_label_is_one_token():
    from dataclasses import replace

    from freelm.demo.pretrain import build_tokenizer

    tokenizer = build_tokenizer(SMALL)
    assert [tokenizer.decode([t]) for t in tokenizer.encode("#6 45\n#5 82\n")] == [
        "#",
        "6",
        " 45",
        "\n",
        "#",
        "5",
        " 82",
        "\n",
    ]
    with pytest.raises(ValueError, match=r"splits counter values \[.*\] / labels"):
        build_tokenizer(replace(SMALL, model=replace(SMALL.model, vocab_size=400)))


def test_pruned_examples_resume_from_the_last_complete_line(tmp_path):
    _, tokenizer, _ = pretrain(PretrainConfig(**{**SMALL.__dict__, "steps": 1}))
    examples = make_examples(generate_problems(5, seed=1, min_turns=6, max_turns=6), tokenizer, 3, 1000, seed=0)
    assert len(examples) == 5 * 5
    for ex in examples:
        context = tokenizer.decode(ex.ids[: ex.prompt_len])
        thinking = context.split("<think>\n", 1)[1]
        assert thinking.count("\n") <= 1  # the oracle left at most one complete line
        assert tokenizer.decode(ex.ids[ex.prompt_len :]).endswith("<|im_end|>")


def test_short_pretraining_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    model, _, losses = pretrain(SMALL, tmp_path / "base")
    assert len(losses) == SMALL.steps
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path / "base")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert AutoTokenizer.from_pretrained(tmp_path / "base").convert_tokens_to_ids("</think>") is not None


def test_cleaning_states_are_what_the_oracle_cleans_and_quoting_spans_all_complete_lines():
    from freelm.cleaners.oracle import oracle_deletions
    from freelm.demo.corpus import cleaning_states, quote_command
    from freelm.demo.pretrain import build_tokenizer
    from freelm.free import apply_deletions, parse_commands

    tokenizer = build_tokenizer(SMALL)
    states = cleaning_states(generate_problems(6, seed=2, min_turns=12, max_turns=12), tokenizer, (8, 12), seed=0)
    assert len(states) > 6 * 2
    for _, thinking in states:
        assert not apply_deletions(thinking, oracle_deletions(thinking)).skipped
        quoted = apply_deletions(thinking, parse_commands(quote_command(thinking)))
        assert not quoted.skipped
        assert "\n" not in quoted.text  # every complete line was inside the quoted span
    assert quote_command("#3 ") == "[]"
    skipped = cleaning_states(generate_problems(6, seed=2, min_turns=12, max_turns=12), tokenizer, (8, 12), 0, 1.0)
    longest = max(t.count("\n") for _, t in states)
    assert max(t.count("\n") for _, t in skipped) > longest  # undeleted rounds pile up, as after a skipped command


def test_collate_puts_loss_on_response_tokens_only():
    examples = [Example([5, 6, 7, 8, 9], 3), Example([1, 2, 3], 1)]
    batch = collate(examples, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 2, 3, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
