"""LLM judge: answer equivalence against the ground truth, for answers a rule-based grader can't settle.

Any OpenAI-compatible endpoint. Verdicts are appended to a JSONL file that is
also the cache: a re-run skips every (source, id, ground truth, answer) that
already has a final verdict, so it costs no requests. HTTP 429/5xx and
connection errors are retried with backoff by the ``openai`` client itself;
an unparseable verdict is asked again, then recorded as ``unparseable``
(counted as incorrect). Requests that still fail are recorded as ``error`` and
retried on the next run. The API key is read by the caller from the
environment and never stored: error texts and stored replies go through
:func:`freelm.redact.redact` (a proxy may echo the Authorization header).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Literal

from freelm.evaluation.extract import last_boxed
from freelm.evaluation.metrics import JudgeKey
from freelm.jsonl import append_jsonl, iter_jsonl, repair_torn_tail
from freelm.redact import redact

Verdict = Literal["correct", "incorrect", "unparseable", "error"]
FINAL_VERDICTS = ("correct", "incorrect", "unparseable")

DEFAULT_JUDGE_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "judge.txt"
_PLACEHOLDERS = ("{problem}", "{ground_truth}", "{answer}")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm)\s*\{([^{}]*)\}")


@lru_cache(maxsize=8)
def load_judge_template(path: str | Path | None = None) -> str:
    """A judge template must contain ``{problem}``, ``{ground_truth}`` and ``{answer}`` (other braces are literal)."""
    path = Path(path) if path is not None else DEFAULT_JUDGE_TEMPLATE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read judge template ({exc})") from exc
    missing = [p for p in _PLACEHOLDERS if p not in text]
    if missing:
        raise ValueError(f"{path}: judge template lacks placeholder(s) {', '.join(missing)}")
    return text


def render_judge_prompt(template: str, problem: str, ground_truth: str, answer: str) -> str:
    """Fill placeholders in one pass, so LaTeX braces and placeholder-like text in answers stay literal."""
    values = {"{problem}": problem, "{ground_truth}": ground_truth, "{answer}": answer}
    return re.sub("|".join(re.escape(p) for p in _PLACEHOLDERS), lambda m: values[m.group(0)], template)


def parse_verdict(text: str | None) -> bool | None:
    """The last ``\\boxed{Correct}``/``\\boxed{Incorrect}`` (any case, ``\\text{}`` allowed); None if absent."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is None:
        return None
    word = _TEXT_WRAPPER.sub(r"\1", boxed).strip().strip(".").lower()
    return {"correct": True, "incorrect": False}.get(word)


@dataclass(frozen=True)
class JudgeItem:
    source: str
    id: str
    problem: str
    ground_truth: str
    answer: str

    @property
    def key(self) -> JudgeKey:
        return (self.source, self.id, self.ground_truth, self.answer)


@dataclass
class Judgment:
    """One line of judge.jsonl."""

    source: str
    id: str
    ground_truth: str
    answer: str
    verdict: Verdict
    model: str
    attempts: int
    raw: str | None = None
    error: str | None = None

    @property
    def key(self) -> JudgeKey:
        return (self.source, self.id, self.ground_truth, self.answer)


def read_judgments(path: str | Path) -> dict[JudgeKey, Judgment]:
    """The latest judgment per key; a torn last line (killed judge) is ignored."""
    names = {f.name for f in fields(Judgment)}
    out: dict[JudgeKey, Judgment] = {}
    for number, obj in iter_jsonl(path):
        try:
            judgment = Judgment(**{k: v for k, v in obj.items() if k in names})
        except TypeError as exc:
            raise ValueError(f"{path}:{number}: not a judgment ({exc})") from exc
        if judgment.verdict not in (*FINAL_VERDICTS, "error"):
            raise ValueError(f"{path}:{number}: unknown verdict {judgment.verdict!r}")
        out[judgment.key] = judgment
    return out


def verdicts_for_grading(judgments: dict[JudgeKey, Judgment]) -> dict[JudgeKey, bool]:
    """Final verdicts as booleans (``unparseable`` = incorrect); ``error`` entries count as not judged."""
    return {k: j.verdict == "correct" for k, j in judgments.items() if j.verdict in FINAL_VERDICTS}


@dataclass
class JudgeSettings:
    model: str
    template: str
    concurrency: int = 8
    parse_retries: int = 2  # extra requests when a verdict is unparseable
    temperature: float = 0.0
    max_tokens: int = 2048


async def _judge_one(client, item: JudgeItem, settings: JudgeSettings) -> Judgment:
    prompt = render_judge_prompt(settings.template, item.problem, item.ground_truth, item.answer)
    secrets = [getattr(client, "api_key", None)]  # a proxy may echo the Authorization header back
    raw = None
    for attempt in range(1, settings.parse_retries + 2):
        try:
            response = await client.chat.completions.create(
                model=settings.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=settings.temperature,
                max_tokens=settings.max_tokens,
            )
        except Exception as exc:  # the client already retried transient errors with backoff
            error = redact(f"{type(exc).__name__}: {exc}", secrets)[:500]
            return Judgment(*item.key, "error", settings.model, attempt, raw, error)
        raw = response.choices[0].message.content if response.choices else None
        raw = redact(raw, secrets) if isinstance(raw, str) else None
        verdict = parse_verdict(raw)
        if verdict is not None:
            return Judgment(*item.key, "correct" if verdict else "incorrect", settings.model, attempt, raw)
    return Judgment(*item.key, "unparseable", settings.model, settings.parse_retries + 1, raw)


async def judge_items(
    items: list[JudgeItem], client, settings: JudgeSettings, cache_path: str | Path, progress: bool = True
) -> dict[JudgeKey, Judgment]:
    """Judge every item without a final verdict in ``cache_path``; append each verdict as it arrives."""
    cache_path = Path(cache_path)
    repair_torn_tail(cache_path)  # else the first new verdict is glued to a killed run's half line
    done = read_judgments(cache_path) if cache_path.exists() else {}
    todo = list({i.key: i for i in items if done.get(i.key) is None or done[i.key].verdict == "error"}.values())
    semaphore = asyncio.Semaphore(settings.concurrency)

    async def bounded(item: JudgeItem) -> Judgment:
        async with semaphore:
            return await _judge_one(client, item, settings)

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="judging", unit="answer", disable=not progress)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with cache_path.open("a", encoding="utf-8") as handle:
        for next_done in asyncio.as_completed([bounded(i) for i in todo]):
            judgment = await next_done
            append_jsonl(handle, asdict(judgment))
            done[judgment.key] = judgment
            bar.update(1)
    bar.close()
    return {i.key: done[i.key] for i in items}
