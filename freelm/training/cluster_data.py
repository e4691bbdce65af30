"""Lay the project's SFT JSONL out the way Megatron-Bridge's SFT dataset reads it.

``GPTSFTDatasetConfig(dataset_root=DIR)`` reads ``DIR/training.jsonl`` and
``DIR/validation.jsonl`` (``megatron/bridge/data/builders/gpt_sft.py``: the
``train_path`` / ``validation_path`` properties), tokenizing the ``prompt`` and
``completion`` columns separately with no chat template
(``data/sft_processing.py: tokenize_prompt_completion_example``). Rows longer
than the sequence length would be cut *inside the prompt* there, training on a
prompt the model never sees at inference, so they are dropped here instead and
counted.

The split is by a hash of the prompt: the same prompt always lands in the same
file (duplicates cannot leak into validation) and re-running gives the same files.
A ``layout.json`` written last records the source file's size and mtime, so
ranks and later runs can tell a finished, current layout from a stale or
half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from freelm.jsonl import iter_jsonl, write_jsonl
from freelm.training.sft_data import END_OF_TURN

TRAINING_FILE = "training.jsonl"
VALIDATION_FILE = "validation.jsonl"
MARKER_FILE = "layout.json"


@dataclass(frozen=True)
class SFTLayout:
    source: str
    source_size: int
    source_mtime_ns: int
    training_rows: int
    validation_rows: int
    dropped_too_long: int
    max_tokens: int | None


def _check_row(path: Path, number: int, row: dict, end_of_turn: str) -> tuple[str, str]:
    where = f"{path}:{number}"
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(completion, str):
        raise ValueError(f"{where}: 'completion' must be a string")
    if not completion.endswith(end_of_turn):
        raise ValueError(f"{where}: completion must end with {end_of_turn!r} (the adapter has to learn to stop)")
    body = completion[: -len(end_of_turn)]
    if body.endswith(end_of_turn):
        raise ValueError(f"{where}: completion ends with {end_of_turn!r} twice")
    try:
        commands = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"{where}: completion before {end_of_turn!r} is not valid JSON ({exc})") from exc
    if not isinstance(commands, list):
        raise ValueError(f"{where}: completion must be a JSON list of deletions, got {type(commands).__name__}")
    return prompt, completion


def _in_validation(prompt: str, fraction: float) -> bool:
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def write_sft_layout(
    train_fp: str | Path,
    out_dir: str | Path,
    *,
    validation_fraction: float = 0.02,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int | None = None,
    end_of_turn: str = END_OF_TURN,
) -> SFTLayout:
    """Validate ``train_fp`` and write ``out_dir/training.jsonl`` + ``validation.jsonl`` + ``layout.json``.

    With ``count_tokens`` and ``max_tokens``, rows whose prompt + completion exceed ``max_tokens``
    tokens are dropped (and counted). Bad rows raise ``ValueError`` naming file and line.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if (count_tokens is None) != (max_tokens is None):
        raise ValueError("count_tokens and max_tokens go together")
    source = Path(train_fp)
    if not source.is_file():
        raise ValueError(f"training data {source} does not exist")
    stat = source.stat()
    train, validation, dropped = [], [], 0
    for number, row in iter_jsonl(source, tolerate_torn_tail=False):
        prompt, completion = _check_row(source, number, row, end_of_turn)
        if count_tokens is not None and count_tokens(prompt) + count_tokens(completion) > max_tokens:
            dropped += 1
            continue
        target = validation if _in_validation(prompt, validation_fraction) else train
        target.append({"prompt": prompt, "completion": completion})
    if validation_fraction > 0 and not validation and len(train) > 1:
        validation.append(train.pop())  # a tiny file still gets a validation row
    if not train:
        raise ValueError(f"{source}: no training rows left (rows dropped as too long: {dropped})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).unlink(missing_ok=True)
    write_jsonl(out / TRAINING_FILE, train)
    write_jsonl(out / VALIDATION_FILE, validation)
    layout = SFTLayout(
        source=str(source.resolve()),
        source_size=stat.st_size,
        source_mtime_ns=stat.st_mtime_ns,
        training_rows=len(train),
        validation_rows=len(validation),
        dropped_too_long=dropped,
        max_tokens=max_tokens,
    )
    tmp = out / (MARKER_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(layout), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MARKER_FILE)
    return layout


def read_sft_layout(train_fp: str | Path, out_dir: str | Path, max_tokens: int | None = None) -> SFTLayout | None:
    """The finished layout of ``train_fp`` (filtered at ``max_tokens``) in ``out_dir``; None if missing,
    unfinished, stale, or filtered for another sequence length."""
    marker = Path(out_dir) / MARKER_FILE
    source = Path(train_fp)
    try:
        layout = SFTLayout(**json.loads(marker.read_text(encoding="utf-8")))
        stat = source.stat()
    except (OSError, ValueError, TypeError):
        return None
    current = (
        layout.source == str(source.resolve())
        and layout.source_size == stat.st_size
        and layout.source_mtime_ns == stat.st_mtime_ns
        and layout.max_tokens == max_tokens
    )
    return layout if current else None
