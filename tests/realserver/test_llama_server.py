"""runner.py --backend openai against the real llama-server with SmolLM2-135M (see conftest.py for the setup).

SmolLM2 is a plain instruct model (no ``<think>`` tokens: the loop's ``<think>\\n``
is text to it), so these tests prove the client against a real server, not the
method's quality: greedy chunked generation equal to one call, a character
split at a chunk boundary, the per-slot window, a second endpoint as cleaner,
startup checks, a server killed and restarted, and 4 rollouts at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from freelm.tokenizer import Tokenizer
from realserver.conftest import ALIAS, read_records, run_runner

pytestmark = pytest.mark.realserver

GREEDY = ["--temperature", "0", "--top-p", "1", "--top-k", "-1"]
PROBLEMS = [
    "What is 12 + 30?",
    "Name three primary colors.",
    "Write one sentence about the sea.",
    "What is the capital of France?",
]
MULTIBYTE = "Copy this line ten times: 日本語 ☕ 東京 ☕ 日本語 ☕ 東京"


def write_problems(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "source": "t", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def base_args(tmp_path: Path, server, tokenizer_dir: Path, prompts: list[str], out: str) -> list[str]:
    data = write_problems(tmp_path / f"{out}.data.jsonl", prompts)
    return [
        "--data", str(data), "--output", str(tmp_path / f"{out}.jsonl"), "--backend", "openai",
        "--endpoint", server.endpoint, "--served-model", ALIAS, "--tokenizer", str(tokenizer_dir),
        "--n-rollouts", "1", "--timeout", "120", "--down-wait", "60", "--context-limit", "1024",
    ]  # fmt: skip


def chunked(clean_every: int) -> list[str]:
    """headtail with room for everything deletes nothing: it only cuts generation into chunks."""
    return ["--mode", "freelm", "--cleaner", "headtail", "--head-tokens", "4000", "--tail-tokens", "4000",
            "--clean-every", str(clean_every)]  # fmt: skip


def ok(result) -> None:
    assert result.returncode == 0, f"runner exited {result.returncode}:\n{result.stderr[-3000:]}"


def test_vanilla_concurrency_4_and_the_manifest_records_what_reached_the_server(
    llama_server, smollm2_tokenizer_dir, tmp_path
):
    args = base_args(tmp_path, llama_server, smollm2_tokenizer_dir, PROBLEMS, "vanilla")
    result = run_runner([*args, "--mode", "vanilla", "--max-tokens", "48", "--concurrency", "4", *GREEDY])
    ok(result)
    records = read_records(tmp_path / "vanilla.jsonl")
    assert len(records) == 4 and all(r["error"] is None for r in records)
    for r in records:  # counted as the server counts (its end token included), within the budget
        assert r["finish_reason"] in ("stop", "length") and 0 < r["generated_tokens"] <= 48
        assert r["finish_reason"] == "stop" or r["generated_tokens"] == 48
    manifest = json.loads((tmp_path / "vanilla.jsonl.manifest.json").read_text())
    served = manifest["served"]["endpoints"][f"openai@{llama_server.url}/v1"]
    assert served["models"] == [ALIAS] and served["token_ids_from_logprobs"] is True
    assert manifest["served"]["reasoner"]["window"]["max_total"] == 1023  # -c 4096 over 4 slots: n_ctx 1024
    assert served["text_prompts"] is False and served["sent"]["repeat_penalty"] == 1.0
    assert served["server_defaults"]["repeat_penalty"] == 1.0  # llama-server's own default, from /props


def test_chunked_generation_equals_one_call_under_greedy(llama_server, smollm2_tokenizer_dir, tmp_path):
    prompts = PROBLEMS[:2]
    one = run_runner([*base_args(tmp_path, llama_server, smollm2_tokenizer_dir, prompts, "one"),
                      "--mode", "vanilla", "--max-tokens", "64", "--concurrency", "1", *GREEDY])  # fmt: skip
    ok(one)
    many = run_runner([*base_args(tmp_path, llama_server, smollm2_tokenizer_dir, prompts, "many"),
                       *chunked(8), "--max-tokens", "64", "--concurrency", "1", *GREEDY])  # fmt: skip
    ok(many)
    text = run_runner([*base_args(tmp_path, llama_server, smollm2_tokenizer_dir, prompts, "text"),
                       *chunked(8), "--max-tokens", "64", "--concurrency", "1", "--text-prompts", *GREEDY])  # fmt: skip
    ok(text)
    one_r, many_r, text_r = (read_records(tmp_path / f"{n}.jsonl") for n in ("one", "many", "text"))
    for a, b, c in zip(one_r, many_r, text_r):
        assert a["response"] == b["response"] == c["response"]
        assert len(b["rounds"]) >= 2
        for rnd in b["rounds"][1:]:  # the ids sent are the server's own: its prompt cache covers them
            assert rnd["cached_tokens"] >= rnd["prompt_tokens"] - 1


def test_multibyte_character_split_at_a_chunk_boundary(llama_server, smollm2_tokenizer_dir, tmp_path):
    one = run_runner([*base_args(tmp_path, llama_server, smollm2_tokenizer_dir, [MULTIBYTE], "mb_one"),
                      "--mode", "vanilla", "--max-tokens", "48", *GREEDY])  # fmt: skip
    ok(one)
    response = read_records(tmp_path / "mb_one.jsonl")[0]["response"]
    tokenizer = Tokenizer.from_pretrained(smollm2_tokenizer_dir)
    ids = tokenizer.encode(response)
    splits = [k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd")]
    assert splits, f"the model wrote no character split over tokens: {response!r}"
    for flags in ([], ["--text-prompts"]):
        name = f"mb_split{len(flags)}"
        result = run_runner([*base_args(tmp_path, llama_server, smollm2_tokenizer_dir, [MULTIBYTE], name),
                             *chunked(splits[0]), "--max-tokens", "48", *flags, *GREEDY])  # fmt: skip
        ok(result)
        record = read_records(tmp_path / f"{name}.jsonl")[0]
        # the greedy continuation of the one call, the split character whole; the dropped partial tokens
        # were generated twice and count against --max-tokens twice, so the chunked text may stop earlier
        assert "\ufffd" not in record["response"] and response.startswith(record["response"])
        assert len(record["response"]) > len(tokenizer.decode(ids[: splits[0]]))
        first = record["rounds"][0]  # the chunk really ended inside the character, and its part was dropped
        assert first["generated_tokens"] == splits[0] and first["context_tokens"] - first["prompt_tokens"] < splits[0]


def test_window_edge_per_slot_context(make_server, smollm2_tokenizer_dir, tmp_path):
    server = make_server(ctx=512, parallel=2).start()  # 256 tokens per slot (llama-server's smallest)
    prompt = "Copy this line forty times: one two three four five six seven eight nine ten"
    args = base_args(tmp_path, server, smollm2_tokenizer_dir, [prompt], "big")
    too_big = run_runner([*args, "--mode", "vanilla", "--max-tokens", "400", *GREEDY])  # --context-limit 1024
    ok(too_big)  # the slot's window (server_limits), not --context-limit, bounds each request: no 400
    assert "serves at most 255 tokens per request" in too_big.stderr
    big = read_records(tmp_path / "big.jsonl")[0]
    assert big["finish_reason"] == "context_overflow" and big["error"] is None
    assert big["peak_context_tokens"] == 255
    args = base_args(tmp_path, server, smollm2_tokenizer_dir, [prompt], "edge")
    result = run_runner([*args[:-2], "--context-limit", "256", *chunked(64), "--max-tokens", "400", *GREEDY])
    ok(result)
    record = read_records(tmp_path / "edge.jsonl")[0]
    assert record["finish_reason"] == "context_overflow" and record["error"] is None
    assert record["peak_context_tokens"] == 255  # the last request filled the slot to its edge, no 400


def test_free_cleaner_on_a_second_endpoint_and_an_unserved_adapter_fails_first(
    llama_server, make_server, smollm2_tokenizer_dir, tmp_path
):
    args = base_args(tmp_path, llama_server, smollm2_tokenizer_dir, PROBLEMS[:2], "free")
    flags = ["--mode", "freelm", "--cleaner", "free", "--clean-every", "16", "--max-tokens", "48",
             "--clean-max-tokens", "24", *GREEDY]  # fmt: skip
    unserved = run_runner([*args, *flags])  # the reasoner's server has no 'smol:free'
    assert unserved.returncode == 2 and not (tmp_path / "free.jsonl").exists()
    assert "adapter 'free'" in unserved.stderr and llama_server.url in unserved.stderr
    cleaner = make_server(alias=f"{ALIAS}:free", ctx=2048, parallel=2).start()  # the base model, named as the adapter
    result = run_runner([*args, *flags, "--cleaner-endpoint", cleaner.endpoint])
    # SmolLM2 writes no deletion JSON: garbage is recorded and skipped, the rollouts go on and all are kept,
    # but a Free()LM run whose cleaner never deletes is no success: flagged, exit 3, naming the reason
    assert result.returncode == 3, f"runner exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert "parse_error" in result.stderr
    records = read_records(tmp_path / "free.jsonl")
    assert sorted(r["id"] for r in records) == ["0", "1"]
    cleans = [rnd["clean"] for r in records for rnd in r["rounds"] if rnd["clean"]]
    assert cleans and all(r["error"] is None for r in records)
    assert all(c["parse_error"] or c["applied"] >= 0 for c in cleans)
    assert any(c["raw_output"] for c in cleans)


def test_server_started_late_then_killed_and_restarted_mid_run(make_server, smollm2_tokenizer_dir, tmp_path):
    server = make_server(ctx=2048, parallel=1)  # not started: the runner must wait for it
    prompts = [f"Write a short poem about the number {i}." for i in range(4)]
    args = base_args(tmp_path, server, smollm2_tokenizer_dir, prompts, "restart")
    proc = run_runner([*args, "--mode", "vanilla", "--max-tokens", "96", "--concurrency", "1", *GREEDY],
                      background=True)  # fmt: skip
    time.sleep(10)  # the runner is up and waiting by now
    server.start()
    out = tmp_path / "restart.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or not out.read_text().strip()):
        time.sleep(0.1)
    server.stop()  # kill -9 with rollouts still to run
    time.sleep(1)
    server.start(wait=False)  # comes back through its loading state (503)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "waiting up to 60s for reasoner" in stderr and "Connection" in stderr  # the wait and its reason
    records = read_records(out)
    assert sorted(r["id"] for r in records) == ["0", "1", "2", "3"] and all(r["error"] is None for r in records)
