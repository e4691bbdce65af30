"""LLM judge: answer equivalence against the ground truth, for answers a rule-based grader can't settle.

Any OpenAI-compatible endpoint. Verdicts are appended to a JSONL file that is
also the cache (:mod:`freelm.evaluation.judgments`): a re-run skips every (source, id, ground truth, answer) that
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
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from freelm.evaluation.extract import last_boxed
from freelm.evaluation.judgments import Judgment, JudgmentCache
from freelm.evaluation.metrics import JudgeKey
from freelm.http_limits import reply_cap, reply_limit, with_transport_reason
from freelm.redact import redact

#: Seconds between two looks at an answer another judge process is asking about.
CLAIM_POLL_S = 0.2

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
class JudgeSettings:
    model: str
    template: str
    concurrency: int = 8
    parse_retries: int = 2  # extra requests when a reply has no verdict or is malformed
    temperature: float = 0.0
    max_tokens: int = 2048
    request_timeout: float = 600.0  # total seconds per call, the client's retries and the whole reply included


class MalformedReply(ValueError):
    """A 200 that is not a chat completion with an assistant message (an HTML error page, a null message...)."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_text(text: str) -> str:
    """Lone surrogates (a JSON ``\\ud800`` escape decodes to one) replaced by U+FFFD: they cannot be written as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def reply_text(response: Any) -> str | None:
    """The assistant text of a chat completion; :class:`MalformedReply` for anything that is not one.

    The openai client returns whatever a 200 held: a ``str`` for a non-JSON body,
    a completion with ``message=None`` when the field was absent or null.
    ``content=None`` is a real (empty) reply.
    """
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        shown = response[:80] if isinstance(response, str) else type(response).__name__
        raise MalformedReply(f"not a chat completion with choices: {shown!r}")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise MalformedReply("choices[0] has no message")
    content = getattr(message, "content", None)
    if content is not None and not isinstance(content, str):
        raise MalformedReply(f"message content is a {type(content).__name__}, not text")
    return content


async def _judge_one(client, item: JudgeItem, settings: JudgeSettings) -> Judgment:
    """Ask until a verdict, ``parse_retries`` more times after a reply without one or a malformed reply.

    A request that fails after the client's own retries (HTTP errors, connection
    errors) or passes its deadline is ``error`` at once. After the last attempt
    the answer is ``unparseable`` when the judge did reply (without a verdict),
    ``error`` when every reply was malformed (a broken server, not the judge's
    answer: the next run asks again).
    """
    import openai

    prompt = _valid_text(render_judge_prompt(settings.template, item.problem, item.ground_truth, item.answer))
    secrets = [getattr(client, "api_key", None)]  # a proxy may echo the Authorization header back

    def failed(attempt: int, raw: str | None, error: str) -> Judgment:
        return Judgment(*item.key, "error", settings.model, attempt, raw, _valid_text(redact(error, secrets))[:500])

    raw, malformed, replied = None, "", False
    for attempt in range(1, settings.parse_retries + 2):
        try:
            with reply_cap(reply_limit(settings.max_tokens)):  # read by the client of http_limits.bounded_httpx_client
                call = client.chat.completions.create(
                    model=settings.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=settings.temperature,
                    max_tokens=settings.max_tokens,
                )
                response = await asyncio.wait_for(call, settings.request_timeout)
            content = reply_text(response)
        except (asyncio.TimeoutError, openai.APITimeoutError):  # ours or the bounded client's (the same deadline)
            return failed(attempt, raw, f"no complete reply within {settings.request_timeout:g} s")
        except openai.APIError as exc:
            if not isinstance(exc, openai.APIResponseValidationError):  # the client already retried it
                return failed(attempt, raw, f"{type(exc).__name__}: {with_transport_reason(exc)}")
            malformed = f"malformed reply: {exc}"
            continue
        except Exception as exc:  # a 200 the client could not read as a completion (untrusted bytes)
            malformed = f"malformed reply: {type(exc).__name__}: {exc}"
            continue
        replied = True
        raw = _valid_text(redact(content, secrets)) if content is not None else None
        verdict = parse_verdict(raw)
        if verdict is not None:
            return Judgment(*item.key, "correct" if verdict else "incorrect", settings.model, attempt, raw)
    if not replied:
        return failed(settings.parse_retries + 1, raw, malformed)
    return Judgment(*item.key, "unparseable", settings.model, settings.parse_retries + 1, raw)


async def judge_items(
    items: list[JudgeItem], client, settings: JudgeSettings, cache_path: str | Path, progress: bool = True
) -> dict[JudgeKey, Judgment]:
    """Judge every item without a final verdict in ``cache_path``; append each verdict as it arrives.

    Judges sharing ``cache_path`` split the work (:class:`~freelm.evaluation.judgments.JudgmentCache`):
    an answer one of them is asking about or has judged is not asked again by another.
    """
    from tqdm import tqdm

    semaphore = asyncio.Semaphore(settings.concurrency)
    stuck: dict[JudgeKey, Judgment] = {}  # answers another judge claimed and never finished (not written)
    with JudgmentCache(cache_path) as cache:
        todo = list({i.key: i for i in items if not cache.final(i.key)}.values())
        bar = tqdm(total=len(todo), desc="judging", unit="answer", disable=not progress)
        waited_s = settings.request_timeout * 2 + 60  # another judge's claim outlives its deadline: it is stuck

        async def one(item: JudgeItem) -> None:
            started = time.monotonic()
            while True:
                async with semaphore:
                    if cache.final(item.key):
                        break  # judged by another judge meanwhile
                    if cache.claim(item.key):
                        try:
                            cache.append(await _judge_one(client, item, settings))
                        finally:
                            cache.release(item.key)
                        break
                if time.monotonic() - started > waited_s:
                    stuck[item.key] = Judgment(
                        *item.key, "error", settings.model, 0, None,
                        f"another judge process has been asking about this answer for over {waited_s:g} s",
                    )  # fmt: skip
                    break
                await asyncio.sleep(CLAIM_POLL_S)
            bar.update(1)

        tasks = [asyncio.ensure_future(one(i)) for i in todo]
        try:
            await asyncio.gather(*tasks)
        finally:  # a failed write stops the run: the other calls end before the cache closes
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        cache.refresh()
        return {i.key: stuck.get(i.key) or cache.done[i.key] for i in items}
