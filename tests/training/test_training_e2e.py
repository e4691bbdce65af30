"""Vanilla trajectories -> synthesis -> data check -> PEFT training -> the adapter served in-process and over HTTP.

Which model does what:

* trajectories and the DISCRIMINATING reward filter run on the counting model:
  the random tiny Qwen3 never answers, so on it pruned and unpruned accuracy
  are both 0 and good and bad deletions look alike;
* the reward filter also runs for real on the tiny Qwen3, through ``freelm synth``
  and the SGLang-protocol test server (k continuations, graded);
* training, in-process loading and ``/load_lora_adapter`` use the tiny Qwen3.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from test_synth import scripted_teacher

from freelm.backends.base import SamplingParams
from freelm.cleaners import FreeModuleCleaner
from freelm.cli import main as freelm_main
from freelm.data import Problem
from freelm.evaluation.grade import GraderPool
from freelm.jsonl import append_jsonl, iter_jsonl
from freelm.loop import LoopConfig, run_rollout
from freelm.records import RolloutRecord, read_rollouts
from freelm.testing.counting import CountingBackend
from freelm.testing.openai_chat_server import ChatFault, OpenAIChatTestServer
from freelm.training.cuts import collect_cuts
from freelm.training.reward import AnswerGrader, RewardFilter
from freelm.training.synth import Synthesizer
from freelm.training.teachers import OpenAITeacher

TARGET = 12
CLEAN_EVERY = 24
BEHAVIOURS = ["Good", "Bad", "Mixed", "Unresolvable", "Empty"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def statuses(path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for _, row in iter_jsonl(path):
        out.setdefault(row["id"], []).append(row["status"])
    return out


@pytest.mark.timeout(120)
def test_trajectories_to_served_adapter(tiny_model_dir, tiny_tokenizer, local_sglang_server, tmp_path, monkeypatch):
    tok = tiny_tokenizer
    # 1. vanilla trajectories, written as runner output
    problems = [Problem(id=b, source="count", prompt=f"{b} count to {TARGET}.", answer=str(TARGET)) for b in BEHAVIOURS]
    with (tmp_path / "problems.jsonl").open("w") as f:
        for p in problems:
            append_jsonl(f, {"id": p.id, "source": p.source, "prompt": p.prompt, "answer": p.answer})
    with (tmp_path / "runs.jsonl").open("w") as f:
        for p in problems:
            result = asyncio.run(
                run_rollout(p.prompt, reasoner=CountingBackend(tok, target=TARGET), tokenizer=tok, cleaner=None)
            )
            record = RolloutRecord.from_result(
                result, id=p.id, source=p.source, rollout=0, seed=0, answer=p.answer, mode="vanilla", config_hash="v"
            )
            append_jsonl(f, record.to_dict())
    runs = read_rollouts(tmp_path / "runs.jsonl")
    cuts = collect_cuts([("runs.jsonl", runs)], problems, tok, CLEAN_EVERY)
    assert len(cuts) >= 2 * len(problems)

    # 2a. synthesis with the discriminating reward filter (counting model), teacher over HTTP
    full = len(tok.encode(runs[0].response))
    loop = LoopConfig(max_tokens=full - CLEAN_EVERY + 4)  # "Bad" prunes the step the count resumes from
    sft = tmp_path / "sft.jsonl"
    with OpenAIChatTestServer(scripted_teacher) as teacher_server:
        teacher_server.script(ChatFault(429))  # retried by the openai client
        teacher = OpenAITeacher(teacher_server.base_url, "teacher", "key", max_retries=2)
        with GraderPool(workers=1) as pool:
            reward = RewardFilter(CountingBackend(tok, target=TARGET), tok, AnswerGrader(pool), k=2, loop=loop)
            synth = Synthesizer(teacher, reward, sft, tmp_path / "sft.synth.jsonl", keep_empty=1.0)
            summary = asyncio.run(synth.run(cuts, progress=False))
        assert summary.teacher_errors == 0 and teacher_server.statuses[429] == 1
        found = statuses(tmp_path / "sft.synth.jsonl")
        assert set(found["Good"]) == {"accepted"} and set(found["Bad"]) == {"rejected_reward"}
        assert set(found["Unresolvable"]) == {"unresolvable"} and set(found["Empty"]) == {"empty_kept"}

        # 2b. the real reward filter on the tiny Qwen3 through `freelm synth` and the SGLang-protocol server
        monkeypatch.setenv("TEACHER_KEY", "key")
        tiny_sft = tmp_path / "tiny_sft.jsonl"
        code = freelm_main([
            "synth", "--runs", str(tmp_path / "runs.jsonl"), "--problems", str(tmp_path / "problems.jsonl"),
            "--output", str(tiny_sft), "--tokenizer", str(tiny_model_dir), "--clean-every", str(CLEAN_EVERY),
            "--max-cuts-per-trajectory", "1", "--teacher-base-url", teacher_server.base_url,
            "--teacher-model", "teacher", "--teacher-api-key-env", "TEACHER_KEY",
            "--reasoner-url", local_sglang_server.url, "--k", "2", "--max-tokens", "6", "--keep-empty", "0",
            "--grader-workers", "1", "--no-progress",
        ])  # fmt: skip
    assert code == 0
    assert local_sglang_server.adapter_requests[None] > 0  # continuations ran on the tiny base model
    log = {row["id"]: row for _, row in iter_jsonl(tmp_path / "tiny_sft.synth.jsonl")}
    assert log["Good"]["status"] == log["Bad"]["status"] == "accepted"  # 0.0 >= 0.0: the random model never answers
    assert log["Good"]["pruned_accuracy"] == log["Good"]["unpruned_accuracy"] == 0.0
    assert log["Empty"]["status"] == "empty_dropped" and log["Unresolvable"]["status"] == "unresolvable"

    # 3. the SFT file passes `freelm data check`
    for path in (sft, tiny_sft):
        assert freelm_main(["data", "check", str(path), "--tokenizer", str(tiny_model_dir)]) == 0

    # 4. PEFT training lowers the loss and leaves a servable adapter
    adapter = tmp_path / "adapter"
    code = freelm_main([
        "train", "--model", str(tiny_model_dir), "--data", str(sft), "--output-dir", str(adapter),
        "--max-steps", "10", "--lr", "1e-2", "--rank", "8", "--alpha", "16", "--dropout", "0",
        "--batch-size", "2", "--grad-accum", "1", "--warmup-steps", "1", "--eval-fraction", "0.2",
        "--eval-every", "5", "--target-modules", *ALL_LINEAR, "--no-progress",
    ])  # fmt: skip
    assert code == 0
    losses = [row["loss"] for _, row in iter_jsonl(adapter / "train_log.jsonl") if "loss" in row]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3]), losses

    # 5. the adapter loads in-process and changes the cleaner's output
    from freelm.backends.local import LocalBackend

    cut = cuts[0]
    greedy = SamplingParams.greedy()
    local = LocalBackend.from_pretrained(tiny_model_dir, adapters={"free": adapter}, threads=1)

    def clean(backend, adapter_name):
        cleaner = FreeModuleCleaner(backend, adapter=adapter_name, max_new_tokens=12, sampling=greedy)
        return asyncio.run(cleaner.clean(cut.problem.prompt, cut.thinking)).raw_output

    trained, base = clean(local, "free"), clean(local, None)
    assert trained != base

    # 6. ... and over HTTP: /load_lora_adapter on the SGLang-protocol server, same greedy output as in-process
    from freelm.backends.sglang import SGLangBackend

    response = httpx.post(
        f"{local_sglang_server.url}/load_lora_adapter", json={"lora_name": "trained", "lora_path": str(adapter)}
    )
    assert response.status_code == 200 and response.json()["success"], response.text
    try:
        remote = SGLangBackend(local_sglang_server.url)
        assert clean(remote, "trained") == trained
        assert clean(remote, None) == base
    finally:
        httpx.post(f"{local_sglang_server.url}/unload_lora_adapter", json={"lora_name": "trained"})
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
