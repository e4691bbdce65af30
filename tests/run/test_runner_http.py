"""The runner against two SGLang-protocol servers over the tiny Qwen3 (+ overfit "free" LoRA); one is killed mid-run.

Server A is the session's in-process test server; server B runs in its own
process so that SIGKILL really takes it down (its listening socket and every
keep-alive connection die at once, as when a node fails).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from repo_paths import REPO

from freelm.jsonl import iter_jsonl
from freelm.manifest import manifest_path
from freelm.run.cli import main

PROBLEMS, ROLLOUTS = 4, 3

SERVER_B = """
import sys, time
import torch
torch.set_num_threads(1)
from freelm.backends.local import LocalBackend
from freelm.testing.sglang_server import SGLangTestServer
backend = LocalBackend.from_pretrained(sys.argv[1], adapters={"free": sys.argv[2]}, threads=1)
server = SGLangTestServer(backend, served_model_name="tiny").start()
print(server.url, flush=True)
time.sleep(600)
"""


def start_server_b(model_dir: Path, adapter_dir: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_B, str(model_dir), str(adapter_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise AssertionError(f"server B did not start: {proc.stderr.read()}")
    return proc, url


def test_two_servers_both_used_one_killed_mid_run_every_rollout_once(
    local_sglang_server, tiny_model_dir, free_adapter_dir, tmp_path
):
    server_a = local_sglang_server
    proc_b, url_b = start_server_b(tiny_model_dir, free_adapter_dir)
    data = tmp_path / "problems.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": i, "prompt": f"What is {i} + 30?", "answer": str(i + 30)}) + "\n" for i in range(PROBLEMS)
        )
    )
    out = tmp_path / "out.jsonl"
    total = PROBLEMS * ROLLOUTS
    seen: dict[str, int] = {}

    def kill_b_after_two_rollouts() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.01)
        seen["lines_at_kill"] = out.read_bytes().count(b"\n") if out.exists() else 0
        seen["a_generate_at_kill"] = server_a.requests["/generate"]
        proc_b.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_b_after_two_rollouts, daemon=True)
    killer.start()
    try:
        code = main(
            [
                "--data", str(data), "--output", str(out), "--n-rollouts", str(ROLLOUTS),
                "--endpoint", server_a.url, "--endpoint", url_b.removeprefix("http://"),
                "--tokenizer", str(tiny_model_dir), "--clean-every", "8", "--max-tokens", "32",
                "--context-limit", "1024", "--clean-max-tokens", "16", "--concurrency", "4",
                "--max-retries", "2", "--timeout", "60", "--no-progress",
                "--accept-unusable-cleaning",  # the test adapter knows one prompt: most answers are not lists
            ]
        )  # fmt: skip
    finally:
        killer.join(timeout=300)
        proc_b.kill()
        proc_b.communicate(timeout=30)

    assert code == 0
    assert 2 <= seen["lines_at_kill"] < total  # the kill landed mid-run
    assert server_a.requests["/generate"] > seen["a_generate_at_kill"]  # A carried on alone
    records = [obj for _, obj in iter_jsonl(out, tolerate_torn_tail=False)]
    keys = [(r["id"], r["rollout"]) for r in records]
    assert sorted(keys) == [(str(i), r) for i in range(PROBLEMS) for r in range(ROLLOUTS)]
    assert all(r["finish_reason"] in ("stop", "length") for r in records)
    assert any(r["cleaning_rounds"] > 0 for r in records)
    manifest = json.loads(manifest_path(out).read_text())
    stats = {e["name"]: e for e in manifest["endpoints"][0]["endpoints"]}
    a, b = stats[f"sglang@{server_a.url}"], stats[f"sglang@{url_b}"]
    assert a["requests"] > 0 and b["requests"] > 0  # both used
    assert a["up"] and not b["up"]
    assert manifest["status"] == "complete" and manifest["summary"]["failed"] == 0
    assert server_a.adapter_requests["free"] > 0  # cleaning went through the adapter
    names = {server_a.url.rstrip("/"), url_b.rstrip("/")}  # as the SGLang client reports them
    rounds = [rnd for r in records for rnd in r["rounds"]]
    assert all(rnd["endpoint"] in names for rnd in rounds)  # every reasoning round says where it ran
    cleans = [rnd["clean"] for rnd in rounds if rnd["clean"] and not rnd["clean"]["error"]]
    assert cleans and all(c["endpoint"] in names for c in cleans)  # and every cleaning call
