"""Check that an adapter directory is one SGLang serves as the Free-Module, before a GPU server finds out.

SGLang (0.5.23, ``sglang/srt/lora/lora_config.py``, ``lora.py``) reads only
``r``, ``lora_alpha``, ``target_modules`` and ``use_dora`` from
``adapter_config.json``, scales by ``lora_alpha / r`` and loads every
``*.safetensors`` in the directory by PEFT's weight names. Anything else that
changes the maths (rsLoRA scaling, per-module ``rank_pattern`` /
``alpha_pattern``) is silently ignored there, so the served adapter would differ
from the trained one. The check follows the loader both ways: a target name is
read by its last dotted part (``utils.py: get_normalized_target_modules``, so
``self_attn.q_proj`` is ``q_proj``), and a layer's q/k/v LoRA is stacked from
``q_proj`` with ``v_proj`` required and ``k_proj`` zero-filled when missing
(``lora.py: normalize_qkv_proj``), so ``q_proj`` without ``v_proj`` fails to load
and ``k_proj``/``v_proj`` without ``q_proj`` are never stacked (their weights are skipped). Both exporters produce such directories: the PEFT trainer
(``save_pretrained``) and Megatron-Bridge (``AutoBridge.export_adapter_ckpt`` or
``iter_*/hf/`` written during training).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

#: Qwen3 projection names SGLang's LoRA supports (``SUPPORTED_LORA_TARGET_MODULES`` in ``utils/common.py``).
QWEN3_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ("all", "all-linear")
_WEIGHT_NAME = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\."
    r"(?P<module>[a-z_]+)\.lora_(?P<ab>[AB])\.weight$"
)
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}


def _module_dims(module: str, cfg: dict[str, Any]) -> tuple[int, int]:
    """(in_features, out_features) of a Qwen3 projection, from the base model's config.json."""
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    inter = cfg["intermediate_size"]
    return {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }[module]


def target_names(targets: list[str]) -> set[str]:
    """Module names as SGLang reads ``target_modules``: the last dotted part (``self_attn.q_proj`` -> ``q_proj``)."""
    return {name.split(".")[-1] for name in targets}


def _qkv_problems(pairs: dict[tuple[int, str], dict[str, tuple[int, ...]]]) -> list[str]:
    """Layers whose q/k/v LoRA SGLang's ``normalize_qkv_proj`` cannot stack (``lora.py``)."""
    out = []
    for layer in sorted({layer for layer, _ in pairs}):
        present = {module for (at, module) in pairs if at == layer}
        if "q_proj" in present and "v_proj" not in present:
            out.append(f"layer {layer}: q_proj LoRA without v_proj: SGLang stacks q/k/v and fails to load it")
        elif "q_proj" not in present and present & {"k_proj", "v_proj"}:
            found = sorted(present & {"k_proj", "v_proj"})
            out.append(f"layer {layer}: {found} LoRA without q_proj: SGLang stacks q/k/v from q_proj and skips them")
    return out


def _config_problems(cfg: dict[str, Any]) -> list[str]:
    out = []
    if cfg.get("peft_type") != "LORA":
        out.append(f"peft_type is {cfg.get('peft_type')!r}, SGLang serves only 'LORA'")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        out.append(f"r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        out.append(f"lora_alpha must be a positive number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        if targets not in ALL_TARGETS:
            out.append(f"target_modules {targets!r}: SGLang takes a list of module names, 'all' or 'all-linear'")
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        unsupported = sorted(set(target_names(targets)) - set(QWEN3_TARGETS))
        if unsupported:
            out.append(
                f"target_modules {unsupported} are not LoRA targets SGLang supports for Qwen3 {list(QWEN3_TARGETS)}"
            )
    else:
        out.append(f"target_modules must be a non-empty list of names, 'all' or 'all-linear', got {targets!r}")
    if cfg.get("use_rslora"):
        out.append("use_rslora is true: SGLang scales by lora_alpha/r, not lora_alpha/sqrt(r)")
    if cfg.get("use_dora"):
        out.append("use_dora is true: the Free-Module is a plain LoRA adapter")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            out.append(f"{key} is not empty ({cfg[key]}): SGLang ignores it and would serve one uniform rank/alpha")
    return out


def _weight_problems(
    files: list[Path], cfg: dict[str, Any], base_config: dict[str, Any] | None
) -> tuple[list[str], set[str]]:
    """Problems with the tensors, and the set of module names that carry weights."""
    from safetensors import safe_open

    r = cfg.get("r") if isinstance(cfg.get("r"), int) else None
    out: list[str] = []
    pairs: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    bad_names: list[str] = []
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except Exception as exc:  # a corrupt file: report, never crash the check
            out.append(f"{path.name}: unreadable safetensors file ({exc})")
            continue
        for name, shape in shapes.items():
            m = _WEIGHT_NAME.match(name)
            if not m or _BLOCK.get(m["module"], "mlp") != m["block"]:
                bad_names.append(name)
                continue
            pairs.setdefault((int(m["layer"]), m["module"]), {})[m["ab"]] = shape
    if bad_names:
        shown = ", ".join(bad_names[:3]) + (f" (+{len(bad_names) - 3} more)" if len(bad_names) > 3 else "")
        out.append(
            f"{len(bad_names)} tensor name(s) not in PEFT's base_model.model.model.layers.N.<block>.<proj>.lora_A/B.weight "
            f"form (SGLang would not load them): {shown}"
        )
    layers = base_config.get("num_hidden_layers") if base_config else None
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            out.append(f"{where}: has lora_{''.join(sorted(ab))} without its lora_{'B' if 'A' in ab else 'A'} pair")
            continue
        a, b = ab["A"], ab["B"]
        if len(a) != 2 or len(b) != 2:
            out.append(f"{where}: LoRA weights must be 2-D, got A{list(a)} B{list(b)}")
            continue
        if r is not None and (a[0] != r or b[1] != r):
            out.append(f"{where}: shapes A{list(a)} B{list(b)} do not match r={r} (expect A [r, in], B [out, r])")
        if layers is not None and layer >= layers:
            out.append(f"{where}: layer index beyond the base model's {layers} layers")
        if base_config and module in QWEN3_TARGETS:
            fan_in, fan_out = _module_dims(module, base_config)
            if a[1] != fan_in or b[0] != fan_out:
                out.append(
                    f"{where}: A{list(a)} B{list(b)} do not fit the base model's {fan_in} -> {fan_out} projection"
                )
    return out + _qkv_problems(pairs), {module for _, module in pairs}


def check_sglang_adapter(adapter_dir: str | Path, base_config: dict[str, Any] | None = None) -> list[str]:
    """Everything that stops SGLang from serving ``adapter_dir`` exactly as trained (empty list = servable).

    ``base_config`` (the base model's ``config.json`` as a dict) adds checks of layer indices and
    projection shapes against the model the adapter will be served on.
    """
    root = Path(adapter_dir)
    if not root.is_dir():
        return [f"{root}: not a directory (SGLang would treat the path as a Hub id and try to download it)"]
    config_path = root / "adapter_config.json"
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in root.glob("*/adapter_config.json"))
        if nested:
            return [
                f"{root}: no adapter_config.json, but subfolder(s) {nested} have one: save_pretrained() with a "
                f"non-default adapter_name writes into DIR/<adapter_name>/; serve {root / nested[0]} or save "
                "with adapter_name='default'"
            ]
        return [f"{root}: no adapter_config.json"]
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{config_path}: not valid JSON ({exc})"]
    if not isinstance(cfg, dict):
        return [f"{config_path}: expected a JSON object"]
    problems = [f"{config_path.name}: {p}" for p in _config_problems(cfg)]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in root.glob("*.bin"))
        hint = f" (found {found}: re-save with safe_serialization)" if found else ""
        return problems + [f"{root}: no *.safetensors weights{hint}"]
    weight_problems, modules = _weight_problems(files, cfg, base_config)
    problems += weight_problems
    if not modules and not weight_problems:
        problems.append(f"{root}: the safetensors files hold no LoRA weights")
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets) and modules:
        untargeted = sorted(modules - target_names(targets))
        if untargeted:
            problems.append(f"weights for {untargeted} but target_modules is {targets}: SGLang would skip them")
        unweighted = sorted(target_names(targets) & set(QWEN3_TARGETS) - modules)
        if unweighted:
            problems.append(f"target_modules lists {unweighted} but the files hold no weights for them")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check an adapter directory against what SGLang's LoRA loader reads.")
    parser.add_argument("adapter_dir")
    parser.add_argument("--base-config", help="the base model's config.json (checks layer count and shapes)")
    args = parser.parse_args(argv)
    base = None
    if args.base_config:
        try:
            base = json.loads(Path(args.base_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read --base-config {args.base_config}: {exc}")
    problems = check_sglang_adapter(args.adapter_dir, base)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        cfg = json.loads((Path(args.adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
        print(
            f"ok: {args.adapter_dir} r={cfg['r']} lora_alpha={cfg['lora_alpha']} target_modules={cfg['target_modules']}"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
