"""Reward-filtered synthesis of Free-Module training data (``freelm synth``).

The paper's recipe: cut vanilla trajectories where the loop would clean, ask a
strong teacher which spans to delete, and keep a suggestion only when deleting
it does not hurt. "Does not hurt" is measured, not assumed: k continuations of
the base model (no cleaner) from the pruned thinking and k from the unpruned
thinking are graded with the evaluation grader, and the example is kept only if
pruned accuracy compares favourably (``>=`` by default) with unpruned accuracy.
Both continuations use the same seeds, so the comparison is paired.

Every decided example is appended to a log (``sft.synth.jsonl`` beside ``sft.jsonl``) with its
status, both accuracies and the token savings; accepted ones also go to the SFT
output. Re-running skips every key found in either file, so a killed run
resumes where it stopped. Teacher failures (network, 5xx after retries) are
not "decided" and are retried by the next run.

The teacher is pluggable (:class:`Teacher`): an OpenAI-compatible endpoint by
default, or an exact oracle for synthetic tasks, behind the same reward filter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from freelm.backends.base import Backend, SamplingParams
from freelm.data import Problem
from freelm.free import apply_deletions, parse_commands
from freelm.loop import LoopConfig, run_rollout
from freelm.prompts import THINK_CLOSE
from freelm.records import RolloutRecord, append_jsonl, iter_jsonl, repair_torn_tail
from freelm.redact import redact
from freelm.tokenizer import Tokenizer
from freelm.training.sft_data import END_OF_TURN, MARKS, PROBLEM_MARK, build_row, template_skeleton

_REPLACEMENT_CHAR = "\ufffd"

Key = tuple[str, str, int, int]  # (source, id, rollout, cut_tokens)


# --------------------------------------------------------------------------- cutting trajectories


@dataclass(frozen=True)
class Cut:
    """One cleaning point of a vanilla trajectory: the thinking the loop would hand the cleaner there."""

    problem: Problem
    rollout: int
    cut_tokens: int  # tokens of thinking before the cut (a multiple of clean_every)
    thinking: str

    @property
    def key(self) -> Key:
        return (self.problem.source, self.problem.id, self.rollout, self.cut_tokens)


def cut_trajectory(record: RolloutRecord, problem: Problem, tokenizer: Tokenizer, clean_every: int) -> list[Cut]:
    """The loop's cleaning points on one trajectory: every ``clean_every`` tokens while still thinking.

    As in the loop, a boundary whose decoded text ends mid-character is not a
    cleaning point, and the thinking ends at ``</think>``. A boundary at the very
    end of the trajectory has no continuation in the data and is not used.
    """
    ids = tokenizer.encode(record.response)
    cuts = []
    for n in range(clean_every, len(ids), clean_every):
        thinking = tokenizer.decode(ids[:n])
        if THINK_CLOSE in thinking:
            break
        if not thinking.endswith(_REPLACEMENT_CHAR):
            cuts.append(Cut(problem=problem, rollout=record.rollout, cut_tokens=n, thinking=thinking))
    return cuts


def collect_cuts(
    runs: Iterable[tuple[str, Sequence[RolloutRecord]]],
    problems: Sequence[Problem],
    tokenizer: Tokenizer,
    clean_every: int,
    max_cuts_per_trajectory: int | None = None,
) -> list[Cut]:
    """Cuts of every vanilla trajectory in ``runs`` (``(file name, records)`` pairs).

    Trajectories that were cleaned are an error (their text is already pruned);
    failed ones (``finish_reason == "error"``) are skipped. The gold answer comes
    from the problem file, falling back to the record's.
    """
    by_key = {p.key: p for p in problems}
    cuts: list[Cut] = []
    for path, records in runs:
        for record in records:
            where = f"{path}: record id={record.id!r} source={record.source!r} rollout={record.rollout}"
            if record.cleaning_rounds:
                raise ValueError(f"{where}: has cleaning rounds; synthesis needs vanilla trajectories")
            if record.finish_reason == "error":
                continue
            problem = by_key.get((record.source, record.id))
            if problem is None:
                raise ValueError(f"{where}: no such problem in the problem file")
            if problem.answer is None:
                if record.answer is None:
                    raise ValueError(f"{where}: no gold answer (needed by the reward filter)")
                problem = replace(problem, answer=record.answer)
            found = cut_trajectory(record, problem, tokenizer, clean_every)
            cuts += found[:max_cuts_per_trajectory] if max_cuts_per_trajectory is not None else found
    return cuts


# --------------------------------------------------------------------------- teachers


@dataclass
class TeacherReply:
    """The teacher's raw answer (parsed by the project's executor) and what it cost."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TeacherError(RuntimeError):
    """The teacher could not answer (after its own retries): the example stays undecided."""


class Teacher(Protocol):
    """Suggests deletions for a thinking prefix; returns text in the Free-Module's JSON format."""

    name: str

    async def suggest(self, problem: Problem, thinking: str) -> TeacherReply: ...


@dataclass
class FunctionTeacher:
    """A local teacher from a function ``(problem, thinking) -> answer text``, e.g. an exact oracle of a synthetic task."""

    fn: Callable[[Problem, str], str]
    name: str = "function"

    async def suggest(self, problem: Problem, thinking: str) -> TeacherReply:
        return TeacherReply(self.fn(problem, thinking))


_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.DOTALL)


def teacher_messages(problem: str, thinking: str, template: str | Path | None = None) -> list[dict[str, str]]:
    """The cleaning prompt as chat messages, so a chat teacher reads exactly the Free-Module's instructions.

    The ChatML structure is read from the template's skeleton (placeholders
    still unfilled), so text inside the problem or the thinking can never split
    a message; the assistant pre-fill is dropped. A template that is not ChatML
    becomes one user message.
    """
    skeleton = template_skeleton(template)

    def fill(text: str) -> str:
        return MARKS.sub(lambda m: problem if m.group(0) == PROBLEM_MARK else thinking, text)

    messages = [
        {"role": role, "content": fill(body)} for role, body in _CHATML.findall(skeleton) if role != "assistant"
    ]
    return messages or [{"role": "user", "content": fill(skeleton)}]


class OpenAITeacher:
    """Any OpenAI-compatible chat-completions endpoint (Gemini, vLLM, SGLang, OpenAI, ...).

    Retries of 429/5xx/timeouts are the ``openai`` client's own (``max_retries``,
    honouring ``Retry-After``); what still fails is a :class:`TeacherError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        *,
        template: str | Path | None = None,
        max_tokens: int = 4096,
        temperature: float = 0.0,
        timeout: float = 600.0,
        max_retries: int = 5,
    ):
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._secret = api_key
        self.model = model
        self.template = template
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.name = f"openai:{model}"

    async def suggest(self, problem: Problem, thinking: str) -> TeacherReply:
        import openai

        try:
            response = await self.client.chat.completions.create(
                model=self.model,
                messages=teacher_messages(problem.prompt, thinking, self.template),
                max_tokens=self.max_tokens,
                temperature=self.temperature,
            )
        except openai.OpenAIError as exc:
            raise TeacherError(redact(f"{type(exc).__name__}: {exc}", [self._secret])[:500]) from None
        choices = getattr(response, "choices", None)
        if not choices:
            raise TeacherError(f"response without choices: {str(response)[:200]}")
        usage = response.usage
        return TeacherReply(
            text=choices[0].message.content or "",
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    async def aclose(self) -> None:
        await self.client.close()


# --------------------------------------------------------------------------- reward filter


class AnswerGrader:
    """The evaluation grader (answer after ``</think>``, then math-verify in worker processes) for async callers.

    The worker pool serves one batch at a time, so batches queue on a lock and
    run in a thread, leaving the event loop free for generation.
    """

    def __init__(self, pool: Any):
        self.pool = pool
        self._lock = asyncio.Lock()

    async def correct(self, gold: str, responses: Sequence[str]) -> list[bool]:
        from freelm.evaluation.extract import extract_answer
        from freelm.evaluation.grade import grade_pairs

        answers = [extract_answer(response).answer for response in responses]
        async with self._lock:
            grades = await asyncio.to_thread(grade_pairs, [(gold, a) for a in answers], self.pool)
        return [grades[(gold, a)].correct for a in answers]


@dataclass
class RewardFilter:
    """Continue ``k`` base-model rollouts from a context and compare pruned with unpruned accuracy."""

    reasoner: Backend
    tokenizer: Tokenizer
    grader: AnswerGrader
    k: int = 4
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(max_tokens=8192))
    comparison: Literal["ge", "gt"] = "ge"
    margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.comparison not in ("ge", "gt"):
            raise ValueError(f"comparison must be 'ge' or 'gt', got {self.comparison!r}")

    async def accuracy(self, cut: Cut, thinking: str) -> float:
        """Share of k continuations from ``thinking`` graded correct; seeds depend only on the cut (paired)."""
        base = zlib.crc32(json.dumps(cut.key).encode()) + self.seed * 7919
        results = await asyncio.gather(
            *(
                run_rollout(
                    cut.problem.prompt,
                    reasoner=self.reasoner,
                    tokenizer=self.tokenizer,
                    cleaner=None,
                    config=self.loop,
                    seed=(base + i) % (2**31),
                    initial_response=thinking,
                )
                for i in range(self.k)
            )
        )
        correct = await self.grader.correct(cut.problem.answer or "", [r.response for r in results])
        return sum(correct) / self.k

    def accepts(self, pruned: float, unpruned: float) -> bool:
        gain = pruned - unpruned - self.margin
        return gain > 1e-12 if self.comparison == "gt" else gain >= -1e-12


# --------------------------------------------------------------------------- synthesis

Status = Literal["accepted", "rejected_reward", "empty_kept", "empty_dropped", "unresolvable", "teacher_parse_error"]
ACCEPTED = ("accepted", "empty_kept")


@dataclass
class SynthOutcome:
    """One decided example: a line of the synthesis log (accepted ones are also SFT rows)."""

    source: str
    id: str
    rollout: int
    cut_tokens: int
    status: Status
    commands: int = 0
    dropped_commands: int = 0
    pruned_accuracy: float | None = None
    unpruned_accuracy: float | None = None
    tokens_before: int = 0
    tokens_saved: int = 0
    chars_saved: int = 0
    teacher_prompt_tokens: int = 0
    teacher_completion_tokens: int = 0
    teacher_output: str = ""

    @property
    def key(self) -> Key:
        return (self.source, self.id, self.rollout, self.cut_tokens)


@dataclass
class SynthSummary:
    """Acceptance rates and teacher cost of one run (resumed examples are counted in ``resumed`` only)."""

    cuts: int = 0
    resumed: int = 0
    teacher_errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    teacher_prompt_tokens: int = 0
    teacher_completion_tokens: int = 0
    tokens_saved_accepted: int = 0

    def add(self, outcome: SynthOutcome) -> None:
        self.statuses[outcome.status] += 1
        self.teacher_prompt_tokens += outcome.teacher_prompt_tokens
        self.teacher_completion_tokens += outcome.teacher_completion_tokens
        if outcome.status in ACCEPTED:
            self.tokens_saved_accepted += outcome.tokens_saved

    def to_dict(self) -> dict[str, Any]:
        decided = sum(self.statuses.values())
        accepted = sum(self.statuses[s] for s in ACCEPTED)
        with_commands = decided - self.statuses["empty_kept"] - self.statuses["empty_dropped"]
        return {
            **asdict(self),
            "statuses": dict(self.statuses),
            "decided": decided,
            "accepted": accepted,
            "acceptance_rate": accepted / decided if decided else None,
            "reward_acceptance_rate": self.statuses["accepted"] / with_commands if with_commands else None,
            "mean_tokens_saved_accepted": self.tokens_saved_accepted / accepted if accepted else None,
        }


def keeps_empty(key: Key, share: float) -> bool:
    """Deterministic per key, so a resumed run keeps the same ``[]`` examples."""
    return random.Random(json.dumps(key)).random() < share


@dataclass
class Synthesizer:
    """Decides cuts one by one (concurrently) and writes their outcomes; see the module docstring."""

    teacher: Teacher
    reward: RewardFilter
    output: Path
    log: Path
    template: str | Path | None = None
    end_of_turn: str = END_OF_TURN
    keep_empty: float = 0.1
    concurrency: int = 8

    def finished_keys(self) -> set[Key]:
        keys: set[Key] = set()
        for path in (self.output, self.log):
            if path.exists():
                repair_torn_tail(path)
                for number, row in iter_jsonl(path):
                    try:
                        keys.add((str(row["source"]), str(row["id"]), int(row["rollout"]), int(row["cut_tokens"])))
                    except (KeyError, TypeError, ValueError) as exc:
                        raise ValueError(f"{path}:{number}: not a synthesis row ({exc})") from exc
        return keys

    async def run(self, cuts: Sequence[Cut], progress: bool = True) -> SynthSummary:
        from tqdm.auto import tqdm

        done = self.finished_keys()
        todo = [cut for cut in cuts if cut.key not in done]
        summary = SynthSummary(cuts=len(cuts), resumed=len(cuts) - len(todo))
        semaphore = asyncio.Semaphore(self.concurrency)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)

        async def one(cut: Cut) -> tuple[Cut, SynthOutcome | None]:
            async with semaphore:
                try:
                    return cut, await self.decide(cut)
                except TeacherError:
                    return cut, None

        with (
            self.output.open("a", encoding="utf-8") as out,
            self.log.open("a", encoding="utf-8") as log,
            tqdm(total=len(todo), desc="synth", unit="ex", disable=not progress) as bar,
        ):
            for next_done in asyncio.as_completed([one(cut) for cut in todo]):
                cut, outcome = await next_done
                bar.update(1)
                if outcome is None:
                    summary.teacher_errors += 1
                    continue
                summary.add(outcome)
                if outcome.status in ACCEPTED:  # SFT row first: a kill in between loses its log line, never the row
                    append_jsonl(out, self.sft_row(cut, outcome))
                append_jsonl(log, asdict(outcome))
                bar.set_postfix(accepted=sum(summary.statuses[s] for s in ACCEPTED))
        return summary

    async def decide(self, cut: Cut) -> SynthOutcome:
        reply = await self.teacher.suggest(cut.problem, cut.thinking)
        outcome = SynthOutcome(
            source=cut.problem.source,
            id=cut.problem.id,
            rollout=cut.rollout,
            cut_tokens=cut.cut_tokens,
            status="teacher_parse_error",
            teacher_prompt_tokens=reply.prompt_tokens,
            teacher_completion_tokens=reply.completion_tokens,
            teacher_output=reply.text,
            tokens_before=len(self.reward.tokenizer.encode(cut.thinking)),
        )
        commands = parse_commands(reply.text)
        if commands.error or (not commands and commands.dropped):
            return outcome
        edit = apply_deletions(cut.thinking, commands)
        outcome.commands, outcome.dropped_commands = len(edit.applied), len(edit.skipped)
        if not commands:
            if not keeps_empty(cut.key, self.keep_empty):
                outcome.status = "empty_dropped"
                return outcome
            outcome.status = "empty_kept"
            outcome.unpruned_accuracy = outcome.pruned_accuracy = await self.reward.accuracy(cut, cut.thinking)
            return outcome
        if not edit.applied:
            outcome.status = "unresolvable"
            return outcome
        outcome.tokens_saved = outcome.tokens_before - len(self.reward.tokenizer.encode(edit.text))
        outcome.chars_saved = edit.chars_deleted
        outcome.pruned_accuracy, outcome.unpruned_accuracy = await asyncio.gather(
            self.reward.accuracy(cut, edit.text), self.reward.accuracy(cut, cut.thinking)
        )
        accepted = self.reward.accepts(outcome.pruned_accuracy, outcome.unpruned_accuracy)
        outcome.status = "accepted" if accepted else "rejected_reward"
        return outcome

    def sft_row(self, cut: Cut, outcome: SynthOutcome) -> dict[str, Any]:
        applied = apply_deletions(cut.thinking, parse_commands(outcome.teacher_output)).applied
        return build_row(
            cut.problem.prompt,
            cut.thinking,
            applied,
            template=self.template,
            end_of_turn=self.end_of_turn,
            source=outcome.source,
            id=outcome.id,
            rollout=outcome.rollout,
            cut_tokens=outcome.cut_tokens,
            pruned_accuracy=outcome.pruned_accuracy,
            unpruned_accuracy=outcome.unpruned_accuracy,
            k=self.reward.k,
            tokens_before=outcome.tokens_before,
            tokens_saved=outcome.tokens_saved,
            teacher=self.teacher.name,
        )


# --------------------------------------------------------------------------- CLI: freelm synth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--runs", nargs="+", required=True, help="vanilla runner output JSONL file(s)")
    io.add_argument("--problems", required=True, help="problem JSONL (id, source, prompt, answer)")
    io.add_argument("--output", required=True, type=Path, help="SFT JSONL to append accepted examples to")
    io.add_argument("--log", type=Path, help="every decided example (default: OUTPUT with .synth.jsonl)")
    io.add_argument("--tokenizer", required=True, help="the REASONER's tokenizer directory (cuts are in its tokens)")
    io.add_argument("--template", help="cleaning template (default: built-in)")
    io.add_argument("--clean-every", type=int, default=4096, help="cut every N thinking tokens, as at inference")
    io.add_argument("--max-cuts-per-trajectory", type=int, help="use only the first N cuts of each trajectory")
    io.add_argument("--limit", type=int, help="process at most N cuts")
    io.add_argument("--keep-empty", type=float, default=0.1, help="share of teacher [] answers kept as examples")
    io.add_argument("--concurrency", type=int, default=8, help="examples decided at once")
    io.add_argument("--no-progress", action="store_true")

    teacher = parser.add_argument_group("teacher (OpenAI-compatible chat completions)")
    teacher.add_argument("--teacher-base-url", required=True, help="e.g. https://.../v1")
    teacher.add_argument("--teacher-model", required=True)
    teacher.add_argument("--teacher-api-key-env", default="OPENAI_API_KEY", help="env var holding the API key")
    teacher.add_argument("--teacher-max-tokens", type=int, default=4096)
    teacher.add_argument("--teacher-temperature", type=float, default=0.0)
    teacher.add_argument("--teacher-timeout", type=float, default=600.0)
    teacher.add_argument("--teacher-retries", type=int, default=5)

    reward = parser.add_argument_group("reward filter (base-model continuations)")
    where = reward.add_mutually_exclusive_group(required=True)
    where.add_argument("--reasoner-url", help="SGLang server of the base model")
    where.add_argument("--reasoner-model-dir", help="run the base model in-process (transformers)")
    reward.add_argument("--k", type=int, default=4, help="continuations per context")
    reward.add_argument("--comparison", choices=("ge", "gt"), default="ge", help="pruned >= or > unpruned + margin")
    reward.add_argument("--margin", type=float, default=0.0)
    reward.add_argument("--max-tokens", type=int, default=8192, help="tokens per continuation")
    reward.add_argument("--context-limit", type=int, default=40960)
    reward.add_argument("--temperature", type=float, default=0.6)
    reward.add_argument("--top-p", type=float, default=0.95)
    reward.add_argument("--top-k", type=int, default=20)
    reward.add_argument("--seed", type=int, default=0)
    reward.add_argument("--grader-workers", type=int, default=2)


def _reasoner(args: argparse.Namespace) -> Backend:
    from freelm.backends import make_backend

    if args.reasoner_url:
        return make_backend("sglang", base_url=args.reasoner_url)
    return make_backend("local", model_dir=args.reasoner_model_dir)


async def _synth_main(args: argparse.Namespace) -> int:
    from freelm.data import load_problems
    from freelm.evaluation.grade import GraderPool
    from freelm.records import read_rollouts

    api_key = os.environ.get(args.teacher_api_key_env)
    if not api_key:
        raise SystemExit(f"freelm synth: set the teacher's API key in ${args.teacher_api_key_env}")
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    runs = [(path, read_rollouts(path)) for path in args.runs]
    cuts = collect_cuts(runs, load_problems(args.problems), tokenizer, args.clean_every, args.max_cuts_per_trajectory)
    cuts = cuts[: args.limit] if args.limit is not None else cuts
    teacher = OpenAITeacher(
        args.teacher_base_url,
        args.teacher_model,
        api_key,
        template=args.template,
        max_tokens=args.teacher_max_tokens,
        temperature=args.teacher_temperature,
        timeout=args.teacher_timeout,
        max_retries=args.teacher_retries,
    )
    reasoner = _reasoner(args)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    loop = LoopConfig(max_tokens=args.max_tokens, context_limit=args.context_limit, sampling=sampling)
    try:
        with GraderPool(workers=args.grader_workers) as pool:
            reward = RewardFilter(
                reasoner, tokenizer, AnswerGrader(pool), args.k, loop, args.comparison, args.margin, args.seed
            )
            synthesizer = Synthesizer(
                teacher,
                reward,
                args.output,
                args.log or args.output.with_suffix(".synth.jsonl"),
                template=args.template,
                keep_empty=args.keep_empty,
                concurrency=args.concurrency,
            )
            summary = await synthesizer.run(cuts, progress=not args.no_progress)
    finally:
        await teacher.aclose()
        await reasoner.aclose()
    print(json.dumps(summary.to_dict(), indent=2))
    return 1 if summary.teacher_errors else 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_synth_main(args))
