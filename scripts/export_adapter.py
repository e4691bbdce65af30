#!/usr/bin/env python
"""Turn a Megatron-Bridge LoRA run into the HF PEFT adapter directory SGLang serves, and check it.

``--lora-checkpoint`` may be the run's checkpoint directory (the latest ``iter_*`` is used), one
``iter_*`` directory, or an ``iter_*/hf`` directory. Training with ``also_save_hf_checkpoint=True``
(the plan's default) already wrote ``iter_*/hf/`` (``training/checkpointing.py: _save_hf_adapter_weights``):
that directory is copied as is, without Megatron. That is the way to take: the alternative,
``AutoBridge.from_hf_pretrained(base).export_adapter_ckpt(checkpoint, output)`` (megatron-bridge 0.6.2,
``models/conversion/auto_bridge.py``), runs in one process on the CPU and materialises the WHOLE base
model with its weights in float32 first (4 bytes per parameter: about 33 GB of host memory for Qwen3-8B,
122 GB for Qwen3-30B-A3B, 940 GB for Qwen3-235B-A22B), so it only runs with ``--cpu-export``.
Either way the result must pass ``freelm.training.adapter_check``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `freelm`

from freelm.training.adapter_check import check_sglang_adapter  # noqa: E402

_ITER = re.compile(r"^iter_(\d+)$")


def resolve_checkpoint(path: Path) -> Path:
    """The iteration directory (or exported hf/ directory) to export from."""
    if (path / "adapter_config.json").is_file() or _ITER.match(path.name):
        return path
    iterations = sorted((int(m[1]), p) for p in path.glob("iter_*") if (m := _ITER.match(p.name)) and p.is_dir())
    if not iterations:
        raise ValueError(f"{path}: neither an adapter directory, an iter_* directory, nor a run with iter_* inside")
    return iterations[-1][1]


#: Host memory of the CPU export: the base model in float32 (parameters from the models' configs).
CPU_EXPORT_MEMORY = "4 bytes per base parameter: ~33 GB for Qwen3-8B, ~122 GB for Qwen3-30B-A3B, ~940 GB for 235B-A22B"


def export(checkpoint: Path, base: str, output: Path, cpu_export: bool) -> str:
    """Write the adapter to ``output``; returns how it was obtained."""
    for ready in (checkpoint, checkpoint / "hf"):
        if (ready / "adapter_config.json").is_file():
            shutil.copytree(ready, output, dirs_exist_ok=True)
            return f"copied {ready}"
    if not cpu_export:
        raise ValueError(
            f"{checkpoint} has no hf/ adapter (train with checkpoint.also_save_hf_checkpoint=True, the plan's "
            f"default). Converting it loads the whole base model on the CPU ({CPU_EXPORT_MEMORY}): pass "
            "--cpu-export to do that"
        )
    from megatron.bridge import AutoBridge

    AutoBridge.from_hf_pretrained(base).export_adapter_ckpt(str(checkpoint), str(output))
    return f"converted {checkpoint} with AutoBridge.export_adapter_ckpt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-model-path", required=True, help="the base model's HF directory (architecture, shapes)")
    parser.add_argument("--lora-checkpoint", required=True, help="run dir, iter_* dir or iter_*/hf dir")
    parser.add_argument("--output", required=True, help="adapter directory to write (pass it to --lora-paths free=DIR)")
    parser.add_argument(
        "--cpu-export", action="store_true", help=f"convert a checkpoint without hf/ on the CPU ({CPU_EXPORT_MEMORY})"
    )
    args = parser.parse_args(argv)

    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        parser.error(f"--output {output} is not empty")
    try:
        checkpoint = resolve_checkpoint(Path(args.lora_checkpoint))
        how = export(checkpoint, args.hf_model_path, output, args.cpu_export)
    except ValueError as exc:
        parser.error(str(exc))
    config_path = Path(args.hf_model_path) / "config.json"
    base_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    problems = check_sglang_adapter(output, base_config)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"{how} -> {output}: ready for SGLang (--lora-paths free={output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
