"""The models freelm reproduces the paper on, as their Hugging Face ``config.json`` describes them: one table.

Two consumers read the same numbers, so they cannot drift apart: the Megatron
plan (:mod:`freelm.training.megatron_plan`) checks parallel sizes against the
layer and head counts and refuses a checkpoint whose ``config.json`` disagrees
(:func:`arch_mismatches`); the efficiency report
(:mod:`freelm.evaluation.efficiency`) takes the KV-cache shape (layers, KV
heads, head dim) from them. Pure Python, no imports from the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelArch:
    """One model's architecture; field names follow Megatron, the HF key is in the comment (defaults: Qwen3's)."""

    name: str  # the short name reports print ("Qwen3-30B-A3B")
    hf_id: str
    num_layers: int  # num_hidden_layers
    hidden_size: int
    ffn_hidden_size: int  # intermediate_size
    num_attention_heads: int
    num_kv_heads: int  # num_key_value_heads (Megatron: num_query_groups)
    max_position_embeddings: int
    num_experts: int = 0  # 0 = dense
    moe_router_topk: int = 0  # num_experts_per_tok
    moe_ffn_hidden_size: int = 0  # moe_intermediate_size
    head_dim: int = 128  # (Megatron: kv_channels); every Qwen3 has 128
    vocab_size: int = 151936  # every Qwen3's vocabulary

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def hf_config(self) -> dict[str, Any]:
        """The ``config.json`` fields :func:`arch_mismatches` compares (a checkpoint of this shape has them)."""
        config = {key: getattr(self, name) for name, key in _HF_KEYS.items() if self.is_moe or name not in _MOE_ONLY}
        return {"architectures": ["Qwen3MoeForCausalLM" if self.is_moe else "Qwen3ForCausalLM"], **config}


#: HF ``config.json`` key for each :class:`ModelArch` field (MoE keys only for MoE models).
_HF_KEYS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "num_experts": "num_experts",
    "moe_router_topk": "num_experts_per_tok",
    "moe_ffn_hidden_size": "moe_intermediate_size",
}
_MOE_ONLY = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size")


def arch_mismatches(arch: ModelArch, hf_config: dict[str, Any]) -> list[str]:
    """Fields where a checkpoint's ``config.json`` disagrees with the table (empty = same model shape)."""
    problems = []
    for name, key in _HF_KEYS.items():
        expected = getattr(arch, name)
        if not arch.is_moe and name in _MOE_ONLY:
            if hf_config.get(key):
                problems.append(f"{key}: checkpoint is MoE ({hf_config[key]}) but the plan's model is dense")
            continue
        if hf_config.get(key) != expected:
            problems.append(f"{key}: checkpoint has {hf_config.get(key)!r}, plan expects {expected!r}")
    return problems


#: THE table. Values from the models' Hugging Face ``config.json`` (Qwen3-8B: 36 layers,
#: 32 Q / 8 KV heads; the Thinking-2507 MoE checkpoints keep the Qwen3-30B-A3B /
#: Qwen3-235B-A22B shapes with a 262,144-token native context). Columns: name, HF id,
#: layers, hidden, FFN, attention heads, KV heads, native context; MoE: experts,
#: experts per token, expert FFN.
ARCHITECTURES: dict[str, ModelArch] = {
    "qwen3-8b": ModelArch("Qwen3-8B", "Qwen/Qwen3-8B", 36, 4096, 12288, 32, 8, 40960),
    "qwen3-30b-a3b": ModelArch(
        "Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Thinking-2507", 48, 2048, 6144, 32, 4, 262144, 128, 8, 768
    ),
    "qwen3-235b-a22b": ModelArch(
        "Qwen3-235B-A22B", "Qwen/Qwen3-235B-A22B-Thinking-2507", 94, 4096, 12288, 64, 4, 262144, 128, 8, 1536
    ),
}

#: The embedded default (``freelm/assets/embedded/base/config.json``; docs/embedded.md): the model the
#: paper-table path runs on a laptop and in CI (``configs/embedded.env``). Not in :data:`ARCHITECTURES`,
#: which holds the paper's models, each with a Megatron plan; the efficiency report has it as a preset.
EMBEDDED = ModelArch("embedded", "freelm/assets/embedded/base", 2, 128, 384, 4, 2, 1024, head_dim=32, vocab_size=576)
