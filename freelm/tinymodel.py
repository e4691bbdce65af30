"""Build tiny Qwen3 checkpoints from scratch: the embedded default's base and the tests' model.

A byte-level BPE tokenizer is trained locally with ``tokenizers`` (ChatML and
``<think>`` markers as special tokens) and a ``Qwen3ForCausalLM`` is created from
a config, so the project exercises exactly the code path of Qwen3-8B without any
download. The saved directory is a normal Hugging Face checkpoint: every backend
and ``AutoTokenizer`` load it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# ChatML with Qwen3's enable_thinking switch: thinking off pre-fills an empty think block.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

_DEFAULT_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let me think. First, compute the sum: 12 + 30 = 42. Wait, check again. So the answer is \\boxed{42}.",
    '[{"prefix": "Let me", "suffix": "again."}]',
    "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=()[]{}<>,.;:!?'\"\n",
]


@dataclass(frozen=True)
class TinyConfig:
    """Shape of a tiny Qwen3, in ``Qwen3Config``'s field names. The defaults build in well under a second (~95k params).

    ``vocab_size`` is the tokenizer's to train; the model takes the trained tokenizer's length.
    """

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0


def train_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 512):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the ChatML/think specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) + _DEFAULT_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, additional_special_tokens=SPECIAL_TOKENS[1:]
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | Path, config: TinyConfig = TinyConfig(), corpus: Iterable[str] = (), seed: int = 0
) -> Path:
    """Write a randomly initialised tiny Qwen3 checkpoint + tokenizer to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size)
    tokenizer.save_pretrained(out)
    model = new_tiny_qwen3(config, tokenizer, seed)
    model.save_pretrained(out)
    (out / "freelm_tiny.json").write_text(json.dumps({"tiny_config": config.__dict__, "seed": seed}, indent=2))
    return out


def new_tiny_qwen3(config: TinyConfig, tokenizer, seed: int = 0):
    """A randomly initialised ``Qwen3ForCausalLM`` of ``config``'s shape for ``tokenizer`` (an HF tokenizer).

    Seeded, so the same call always gives the same weights; eos and pad come
    from the tokenizer so generation stops where the chat template ends a turn.
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.pad_token_id
    qcfg = Qwen3Config(
        **{**asdict(config), "vocab_size": len(tokenizer)},
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qcfg)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    return model
