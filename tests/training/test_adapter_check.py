"""adapter_check on a real PEFT adapter saved from the tiny Qwen3, and on broken variants of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from freelm.tinymodel import build_tiny_model  # noqa: E402
from freelm.training.adapter_check import check_sglang_adapter, main  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny base model and two adapters saved by PEFT: under the default name and under "free"."""
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    base_dir = build_tiny_model(root / "base")
    base_config = json.loads((base_dir / "config.json").read_text())
    out = {"base_config": base_config}
    for name, adapter_name in (("default", "default"), ("named", "free")):
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        peft_model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
            adapter_name=adapter_name,
        )
        peft_model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _rewrite_weights(adapter: Path, transform) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    save_file(transform(load_file(path)), path)


def test_peft_saved_adapter_is_servable(tiny):
    assert check_sglang_adapter(tiny["default"]) == []
    assert check_sglang_adapter(tiny["default"], tiny["base_config"]) == []
    assert main([str(tiny["default"])]) == 0


def test_subfolder_pitfall_points_at_the_real_directory(tiny):
    problems = check_sglang_adapter(tiny["named"])
    assert len(problems) == 1
    assert "['free']" in problems[0] and "adapter_name" in problems[0]
    assert check_sglang_adapter(tiny["named"] / "free") == []


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"use_rslora": True}, "use_rslora"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"alpha_pattern": {"o_proj": 32}}, "alpha_pattern"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"r": "8"}, "r must be a positive integer"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens"),
        ({"target_modules": ".*proj"}, "'all' or 'all-linear'"),
        ({"use_dora": True}, "use_dora"),
    ],
)
def test_config_that_sglang_would_misread(tiny, tmp_path, changes, needle):
    adapter = _copy(tiny["default"], tmp_path / "a")
    _edit_config(adapter, **changes)
    problems = check_sglang_adapter(adapter)
    assert any(needle in p for p in problems), problems


def test_all_linear_is_accepted(tiny, tmp_path):
    adapter = _copy(tiny["default"], tmp_path / "a")
    _edit_config(adapter, target_modules="all-linear")
    assert check_sglang_adapter(adapter) == []


def test_rank_in_config_must_match_tensors(tiny, tmp_path):
    adapter = _copy(tiny["default"], tmp_path / "a")
    _edit_config(adapter, r=4)
    problems = check_sglang_adapter(adapter)
    assert any("do not match r=4" in p for p in problems), problems


def test_missing_weights_and_bin_only(tiny, tmp_path):
    adapter = _copy(tiny["default"], tmp_path / "a")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    problems = check_sglang_adapter(adapter)
    assert any("no *.safetensors" in p and "adapter_model.bin" in p for p in problems), problems


def test_weight_names_outside_peft_form(tiny, tmp_path):
    adapter = _copy(tiny["default"], tmp_path / "a")
    _rewrite_weights(adapter, lambda sd: {k.replace("base_model.model.", ""): v for k, v in sd.items()})
    problems = check_sglang_adapter(adapter)
    assert any("not in PEFT's" in p for p in problems), problems


def test_unpaired_and_misshapen_tensors(tiny, tmp_path):
    adapter = _copy(tiny["default"], tmp_path / "a")

    def damage(sd):
        sd = dict(sd)
        del sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        key = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
        sd[key] = torch.zeros(8, sd[key].shape[1] + 1)
        return sd

    _rewrite_weights(adapter, damage)
    problems = check_sglang_adapter(adapter, tiny["base_config"])
    assert any("layer 0 q_proj" in p and "without its lora_B" in p for p in problems), problems
    assert any("layer 1 o_proj" in p and "do not fit" in p for p in problems), problems


def test_targets_without_weights_and_weights_without_targets(tiny, tmp_path):
    adapter = _copy(tiny["default"], tmp_path / "a")
    _edit_config(adapter, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"])
    problems = check_sglang_adapter(adapter)
    assert any("['o_proj']" in p and "skip" in p for p in problems), problems
    assert any("['gate_proj']" in p and "no weights" in p for p in problems), problems


def test_not_a_directory_and_bad_json(tmp_path):
    assert "not a directory" in check_sglang_adapter(tmp_path / "missing")[0]
    (tmp_path / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in check_sglang_adapter(tmp_path)[0]
    assert main([str(tmp_path)]) == 1


def test_dotted_target_names_are_read_by_their_last_part(tiny, tmp_path):
    """SGLang's get_normalized_target_modules keeps name.split(".")[-1]: a dotted list is the same adapter."""
    adapter = _copy(tiny["default"], tmp_path / "a")
    _edit_config(adapter, target_modules=[f"self_attn.{t}" for t in TARGETS])
    assert check_sglang_adapter(adapter, tiny["base_config"]) == []


def test_q_proj_needs_v_proj_and_k_v_need_q_proj(tiny, tmp_path):
    """lora.py normalize_qkv_proj stacks q/k/v from q_proj: v_proj is required, k_proj may be missing."""
    no_v = _copy(tiny["default"], tmp_path / "no_v")
    _rewrite_weights(no_v, lambda sd: {k: v for k, v in sd.items() if "v_proj" not in k})
    _edit_config(no_v, target_modules=["q_proj", "k_proj", "o_proj"])
    problems = check_sglang_adapter(no_v)
    assert any("q_proj LoRA without v_proj" in p for p in problems), problems

    no_k = _copy(tiny["default"], tmp_path / "no_k")
    _rewrite_weights(no_k, lambda sd: {k: v for k, v in sd.items() if "k_proj" not in k})
    _edit_config(no_k, target_modules=["q_proj", "v_proj", "o_proj"])
    assert check_sglang_adapter(no_k) == []  # k_proj is zero-filled by SGLang

    no_q = _copy(tiny["default"], tmp_path / "no_q")
    _rewrite_weights(no_q, lambda sd: {k: v for k, v in sd.items() if "q_proj" not in k})
    _edit_config(no_q, target_modules=["k_proj", "v_proj", "o_proj"])
    problems = check_sglang_adapter(no_q)
    assert any("['k_proj', 'v_proj'] LoRA without q_proj" in p for p in problems), problems
