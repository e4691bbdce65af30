"""Other tools' output rows as rollout records, so ``eval_passk.py`` grades them like the runner's own.

A row needs a problem id, a benchmark name and a response; everything else is
optional. Accepted names (the first present wins):

* id: ``id``, ``doc_id`` (lm-evaluation-harness), ``problem_id``
* benchmark: ``source``, else ``--source NAME``
* response: ``response``, ``generation`` (NeMo-Skills), ``output``, ``completion``, ``model_output``;
  or a list in ``filtered_resps`` / ``resps`` (lm-evaluation-harness ``--log_samples``: one rollout per
  element, nested one-element lists flattened)
* rollout index: ``rollout``, else the row's position among the rows of its problem
* answer: ``answer``, ``expected_answer`` (NeMo-Skills), ``target`` (lm-evaluation-harness), else the
  answer of the same ``(source, id)`` in ``--data``
* generated tokens: ``generated_tokens``, ``num_generated_tokens`` (NeMo-Skills); prompt tokens:
  ``prompt_tokens``, ``num_input_tokens``

What a row does not carry stays ``None`` (reported as absent, never as zero):
the runner's context and cleaning columns do not exist for other tools.
A file whose rows are complete runner records is read as such (every field kept).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from freelm.jsonl import iter_jsonl
from freelm.records import RolloutRecord, rollouts_from_rows

ID_FIELDS = ("id", "doc_id", "problem_id")
RESPONSE_FIELDS = ("response", "generation", "output", "completion", "model_output")
RESPONSE_LIST_FIELDS = ("filtered_resps", "resps")
ANSWER_FIELDS = ("answer", "expected_answer", "target")
GENERATED_FIELDS = ("generated_tokens", "num_generated_tokens")
PROMPT_FIELDS = ("prompt_tokens", "num_input_tokens")
EXTERNAL_MODE = "external"
#: Runner-only columns: None in an external record (the metrics report them as absent).
_ABSENT = (
    "final_context_tokens",
    "peak_context_tokens",
    "cleaning_rounds",
    "wall_time_s",
    "reasoning_time_s",
    "cleaning_time_s",
)


def _first(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    return next((row[n] for n in names if row.get(n) is not None), None)


def _responses(row: dict[str, Any], where: str) -> list[str]:
    single = _first(row, RESPONSE_FIELDS)
    if single is not None:
        if not isinstance(single, str):
            raise ValueError(f"{where}: response must be a string, got {type(single).__name__}")
        return [single]
    listed = _first(row, RESPONSE_LIST_FIELDS)
    if listed is None:
        names = ", ".join(RESPONSE_FIELDS + RESPONSE_LIST_FIELDS)
        raise ValueError(f"{where}: no response field (expected one of {names})")
    flat = [item[0] if isinstance(item, list) and len(item) == 1 else item for item in listed]
    if not flat or not all(isinstance(item, str) for item in flat):
        raise ValueError(f"{where}: {RESPONSE_LIST_FIELDS} must be a non-empty list of strings")
    return flat


def _count(row: dict[str, Any], names: tuple[str, ...], where: str) -> int | None:
    value = _first(row, names)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {names[0]} must be an integer, got {value!r}")
    return value


def external_records(
    rows: list[tuple[int, dict[str, Any]]],
    path: str | Path,
    *,
    source: str | None = None,
    answers: dict[tuple[str, str], str | None] | None = None,
) -> list[RolloutRecord]:
    """Records from ``(line, row)`` pairs of ``path``; errors name the file, line and field."""
    answers = answers or {}
    seen: dict[tuple[str, str], int] = defaultdict(int)
    records = []
    for number, row in rows:
        where = f"{path}:{number}"
        raw_id = _first(row, ID_FIELDS)
        if raw_id is None:
            raise ValueError(f"{where}: no problem id (expected one of {', '.join(ID_FIELDS)})")
        bench = row.get("source") if row.get("source") is not None else source
        if bench is None:
            raise ValueError(f"{where}: no 'source' field: name the benchmark with --source NAME")
        key = (str(bench), str(raw_id))
        answer = _first(row, ANSWER_FIELDS)
        if answer is None:
            answer = answers.get(key)
        generated, prompt = _count(row, GENERATED_FIELDS, where), _count(row, PROMPT_FIELDS, where)
        for response in _responses(row, where):
            rollout = row.get("rollout")
            if rollout is None:
                rollout = seen[key]
            elif isinstance(rollout, bool) or not isinstance(rollout, int):
                raise ValueError(f"{where}: rollout must be an integer, got {rollout!r}")
            seen[key] = max(seen[key], rollout) + 1
            records.append(
                RolloutRecord(
                    id=key[1],
                    source=key[0],
                    rollout=rollout,
                    seed=0,
                    answer=None if answer is None else str(answer),
                    mode=EXTERNAL_MODE,
                    config_hash="",
                    response=response,
                    finish_reason=row.get("finish_reason") or "absent",
                    prompt=row.get("prompt") if isinstance(row.get("prompt"), str) else None,
                    **{"prompt_tokens": prompt, "generated_tokens": generated, **dict.fromkeys(_ABSENT)},
                )
            )
    return records


def read_any_rollouts(
    path: str | Path, *, source: str | None = None, answers: dict[tuple[str, str], str | None] | None = None
) -> list[RolloutRecord]:
    """Runner records when every row is one, else other tools' rows (see the module docstring)."""
    rows = list(iter_jsonl(path))
    if rows and "config_hash" in rows[0][1]:  # the runner's own format: read strictly, every field kept
        return rollouts_from_rows(rows, path)
    return external_records(rows, path, source=source, answers=answers)
