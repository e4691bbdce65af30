#!/usr/bin/env python
"""Convert a Hugging Face checkpoint into the Megatron checkpoint Megatron-Bridge fine-tunes from (``nemo_path``).

Runs ``AutoBridge.import_ckpt`` (megatron-bridge 0.6.2, ``models/conversion/auto_bridge.py``), which
loads the HF model, builds the Megatron model on CPU and saves a ``torch_dist`` checkpoint plus the
tokenizer. Needs the training environment (requirements.train.txt), not the serving one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="HF model directory or Hub id (e.g. Qwen/Qwen3-8B)")
    parser.add_argument("--output", required=True, help="directory for the Megatron checkpoint")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype the HF weights are loaded in")
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty --output")
    args = parser.parse_args(argv)

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        parser.error(f"--output {out} is not empty (pass --overwrite to write into it)")
    local = Path(args.input)
    if local.exists() and not (local / "config.json").is_file():
        parser.error(f"--input {local} is a path but has no config.json")

    import torch
    from megatron.bridge import AutoBridge

    AutoBridge.import_ckpt(args.input, str(out), torch_dtype=getattr(torch, args.dtype))
    print(f"wrote Megatron checkpoint of {args.input} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
