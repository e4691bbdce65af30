"""KV bytes per sample from model shapes, and the efficiency report against a baseline."""

import json
from pathlib import Path

import pytest
from repo_paths import EVAL_FIXTURES

from freelm.evaluation.efficiency import PRESETS, efficiency_rows, kv_spec_from_config, resolve_kv_spec
from freelm.evaluation.runs import load_runs


def test_preset_bytes_per_token():
    assert PRESETS["qwen3-8b"].bytes_per_token == 36 * 8 * 128 * 2 * 2
    assert PRESETS["qwen3-235b-a22b"].bytes_per_token == 94 * 4 * 128 * 2 * 2
    # MLA caches one 576-wide latent per layer (+ the FP8 indexer key), not K and V per head
    assert PRESETS["deepseek-v3.2"].bytes_per_token == 61 * (576 * 2 + 128)
    # the paper's 6.14 GB per sample on Qwen3-235B-A22B is ~31.9k tokens of peak context
    assert 6.14e9 / PRESETS["qwen3-235b-a22b"].bytes_per_token == pytest.approx(31894, rel=1e-3)


def test_config_json(tmp_path):
    cfg = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
        "torch_dtype": "float32",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = kv_spec_from_config(tmp_path)
    assert (spec.layers, spec.kv_heads, spec.head_dim, spec.dtype_bytes) == (2, 2, 16, 4)
    assert spec.bytes_per_token == 2 * 2 * 2 * 16 * 4
    mla = {"num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(mla))
    assert kv_spec_from_config(tmp_path).bytes_per_token == 61 * 576 * 2
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="missing field 'num_hidden_layers'"):
        kv_spec_from_config(tmp_path)
    with pytest.raises(ValueError, match="unknown model"):
        resolve_kv_spec("no-such-model")


def test_efficiency_rows_against_baseline():
    runs, base = load_runs([str(EVAL_FIXTURES / "vanilla.jsonl"), str(EVAL_FIXTURES / "freelm.jsonl")], "vanilla")
    spec = PRESETS["qwen3-8b"]
    rows = {r.name: r for r in efficiency_rows({r.name: r.records for r in runs}, spec, base.name)}
    van, free = rows["vanilla"], rows["freelm"]
    peaks = [r.peak_context_tokens for r in runs[0].records]
    assert van.kv_gb_per_sample == pytest.approx(sum(peaks) / len(peaks) * spec.bytes_per_token / 1e9)
    assert van.latency_overhead is None
    assert free.latency_overhead == pytest.approx(free.mean_wall_time_s / van.mean_wall_time_s - 1)
    assert free.kv_change == pytest.approx(free.kv_gb_per_sample / van.kv_gb_per_sample - 1)
    assert free.kv_change < 0 < free.latency_overhead


def test_wall_time_is_the_records_own_not_reasoning_plus_cleaning():
    """Wall time includes what neither reasoning nor cleaning latency counts (re-prefill, queueing):
    the row's mean and the overhead come from ``wall_time_s`` itself."""
    from dataclasses import replace

    runs, _ = load_runs([str(EVAL_FIXTURES / "vanilla.jsonl"), str(EVAL_FIXTURES / "freelm.jsonl")], "vanilla")
    van, free = runs[0].records, runs[1].records
    free = [replace(r, wall_time_s=r.reasoning_time_s + r.cleaning_time_s + 10.0 * (i + 1)) for i, r in enumerate(free)]
    van = [replace(r, wall_time_s=r.reasoning_time_s + 2.0) for r in van]
    rows = {r.name: r for r in efficiency_rows({"vanilla": van, "freelm": free}, PRESETS["qwen3-8b"], "vanilla")}
    mean_free = sum(r.wall_time_s for r in free) / len(free)
    mean_van = sum(r.wall_time_s for r in van) / len(van)
    assert rows["freelm"].mean_wall_time_s == pytest.approx(mean_free)
    assert rows["vanilla"].mean_wall_time_s == pytest.approx(mean_van) == pytest.approx(103.5)
    assert rows["freelm"].mean_reasoning_time_s == pytest.approx(121.5)
    assert rows["freelm"].mean_cleaning_time_s == pytest.approx(30.0)
    assert rows["freelm"].latency_overhead == pytest.approx(mean_free / mean_van - 1)


def test_the_embedded_preset_is_the_embedded_model_as_its_config_json_says():
    import freelm
    from freelm.model_facts import EMBEDDED, arch_mismatches

    base = Path(freelm.__file__).parent / "assets" / "embedded" / "base"
    assert arch_mismatches(EMBEDDED, json.loads((base / "config.json").read_text())) == []
    preset, read = PRESETS["embedded"], kv_spec_from_config(base)
    assert (preset.layers, preset.kv_heads, preset.head_dim, preset.dtype_bytes) == (
        read.layers, read.kv_heads, read.head_dim, read.dtype_bytes,
    )  # fmt: skip
    assert preset.bytes_per_token == 2 * 2 * 32 * 2 * 4 == 1024  # float32, as config.json and as served
    assert resolve_kv_spec("embedded") is preset


def test_a_small_models_kv_size_is_printed_not_rounded_to_zero():
    from freelm.evaluation.efficiency import EfficiencyRow, efficiency_markdown

    row = EfficiencyRow("Free()LM", 20, 90.0, 90 * 1024 / 1e9, 190.0, 1.0, 0.5, 0.5)
    table = efficiency_markdown([row], PRESETS["embedded"])
    assert "| Free()LM | 20 | 90 | 9.22e-05 | 190 |" in table
    assert "KV bytes/token for embedded: 1,024 (K+V per KV head, 4-byte cache)." in table
