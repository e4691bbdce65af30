"""Efficiency in the paper's terms: KV-cache bytes per sample, generated tokens, latency overhead.

KV bytes per sample = bytes per token (from the model's attention shape) x the
rollout's PEAK context tokens: the peak, not the final length, is what the
server must hold at once. Free()LM lowers it by deleting spans; the price is
the cleaning calls and the re-prefill after each deletion, which the wall-time
overhead against a vanilla run captures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from freelm.model_facts import ARCHITECTURES, EMBEDDED
from freelm.records import RolloutRecord

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "fp8": 1}


@dataclass(frozen=True)
class KVSpec:
    """Per-token KV footprint of one model; MLA models cache one latent per layer instead of K and V per head."""

    name: str
    layers: int
    kv_heads: int = 0
    head_dim: int = 0
    dtype_bytes: int = 2
    mla_latent_dim: int | None = None  # kv_lora_rank + qk_rope_head_dim (DeepSeek MLA)
    indexer_dim: int = 0  # DeepSeek-V3.2 sparse-attention indexer keys, per token and layer
    indexer_bytes: int = 1  # the indexer cache is FP8 in DeepSeek's kernels

    @property
    def bytes_per_token(self) -> int:
        if self.mla_latent_dim is not None:
            per_layer = self.mla_latent_dim * self.dtype_bytes
        else:
            per_layer = 2 * self.kv_heads * self.head_dim * self.dtype_bytes  # K and V
        return self.layers * (per_layer + self.indexer_dim * self.indexer_bytes)


#: The Qwen3 shapes from :data:`freelm.model_facts.ARCHITECTURES` (bf16 KV cache), the embedded default
#: (float32 weights, so a float32 cache as served: scripts/smoke_sglang.sh --dtype float32, the stand-in),
#: plus DeepSeek-V3.2.
PRESETS = {
    **{
        key: KVSpec(arch.name, layers=arch.num_layers, kv_heads=arch.num_kv_heads, head_dim=arch.head_dim)
        for key, arch in ARCHITECTURES.items()
    },
    "embedded": KVSpec(
        EMBEDDED.name,
        layers=EMBEDDED.num_layers,
        kv_heads=EMBEDDED.num_kv_heads,
        head_dim=EMBEDDED.head_dim,
        dtype_bytes=4,
    ),  # fmt: skip
    # MLA: kv_lora_rank 512 + qk_rope_head_dim 64 per layer; DSA indexer: index_head_dim 128.
    "deepseek-v3.2": KVSpec("DeepSeek-V3.2", layers=61, mla_latent_dim=512 + 64, indexer_dim=128),
}


def kv_spec_from_config(path: str | Path, dtype_bytes: int | None = None) -> KVSpec:
    """Read a Hugging Face ``config.json`` (or a model directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read model config ({exc})") from exc
    cfg = cfg.get("text_config", cfg)
    try:
        layers = int(cfg["num_hidden_layers"])
        if dtype_bytes is None:
            dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
            dtype_bytes = _DTYPE_BYTES.get(dtype.removeprefix("torch."), 2)
        if cfg.get("kv_lora_rank"):
            return KVSpec(
                path.parent.name,
                layers,
                dtype_bytes=dtype_bytes,
                mla_latent_dim=int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim", 0)),
                indexer_dim=int(cfg.get("index_head_dim", 0)),
            )
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    except KeyError as exc:
        raise ValueError(f"{path}: missing field {exc.args[0]!r} needed for the KV size") from exc
    return KVSpec(path.parent.name, layers, kv_heads, head_dim, dtype_bytes)


def resolve_kv_spec(model: str) -> KVSpec:
    """A preset name (case-insensitive) or a path to a config.json / model directory."""
    preset = PRESETS.get(model.lower())
    if preset is not None:
        return preset
    if Path(model).exists():
        return kv_spec_from_config(model)
    raise ValueError(f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}) or a config.json path")


@dataclass
class EfficiencyRow:
    name: str
    rollouts: int
    mean_peak_context_tokens: float
    kv_gb_per_sample: float  # mean over rollouts of bytes_per_token x peak context, in 1e9 bytes
    mean_generated_tokens: float
    mean_wall_time_s: float
    mean_reasoning_time_s: float
    mean_cleaning_time_s: float
    kv_change: float | None = None  # relative to the baseline run
    latency_overhead: float | None = None  # mean wall time / baseline mean wall time - 1


def _mean(values: list[float]) -> float:
    if not values:
        raise ValueError("no rollouts")
    return sum(values) / len(values)


def efficiency_rows(
    runs: dict[str, list[RolloutRecord]], spec: KVSpec, baseline: str | None = None
) -> list[EfficiencyRow]:
    rows = []
    for name, recs in runs.items():
        rows.append(
            EfficiencyRow(
                name=name,
                rollouts=len(recs),
                mean_peak_context_tokens=_mean([r.peak_context_tokens for r in recs]),
                kv_gb_per_sample=_mean([r.peak_context_tokens * spec.bytes_per_token / 1e9 for r in recs]),
                mean_generated_tokens=_mean([r.generated_tokens for r in recs]),
                mean_wall_time_s=_mean([r.wall_time_s for r in recs]),
                mean_reasoning_time_s=_mean([r.reasoning_time_s for r in recs]),
                mean_cleaning_time_s=_mean([r.cleaning_time_s for r in recs]),
            )
        )
    if baseline is not None:
        base = next((r for r in rows if r.name == baseline), None)
        if base is None:
            raise ValueError(f"baseline {baseline!r} is not one of the runs ({', '.join(runs)})")
        for row in rows:
            if row is not base:
                row.kv_change = row.kv_gb_per_sample / base.kv_gb_per_sample - 1 if base.kv_gb_per_sample else None
                row.latency_overhead = (
                    row.mean_wall_time_s / base.mean_wall_time_s - 1 if base.mean_wall_time_s else None
                )
    return rows


def _gb(value: float) -> str:
    """Two decimals, or three significant digits below 0.01 GB (a small model's KV: the embedded default's is ~1e-4)."""
    return f"{value:.2f}" if value >= 0.01 or value == 0 else f"{value:.3g}"


def efficiency_markdown(rows: list[EfficiencyRow], spec: KVSpec) -> str:
    head = "| Run | rollouts | peak ctx | KV GB/sample | gen tokens | wall s/rollout | reasoning s | cleaning s | KV change | latency overhead |"
    lines = [head, "|---|" + "---:|" * 9]
    for r in rows:
        kv = "" if r.kv_change is None else f"{100 * r.kv_change:+.1f}%"
        lat = "" if r.latency_overhead is None else f"{100 * r.latency_overhead:+.1f}%"
        lines.append(
            f"| {r.name} | {r.rollouts} | {r.mean_peak_context_tokens:.0f} | {_gb(r.kv_gb_per_sample)} | "
            f"{r.mean_generated_tokens:.0f} | {r.mean_wall_time_s:.1f} | {r.mean_reasoning_time_s:.1f} | "
            f"{r.mean_cleaning_time_s:.1f} | {kv} | {lat} |"
        )
    lines.append("")
    lines.append(
        f"KV bytes/token for {spec.name}: {spec.bytes_per_token:,} "
        f"({'MLA latent' if spec.mla_latent_dim else 'K+V per KV head'}, {spec.dtype_bytes}-byte cache)."
    )
    return "\n".join(lines) + "\n"


def efficiency_dict(rows: list[EfficiencyRow], spec: KVSpec) -> dict:
    return {"model": {**asdict(spec), "bytes_per_token": spec.bytes_per_token}, "runs": [asdict(r) for r in rows]}
