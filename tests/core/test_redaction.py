"""Secrets never reach disk or an output stream, even from a server that echoes the Authorization header.

Some proxies quote the request's headers in their error bodies, and a model can
quote them in a 200 reply. The judge, the runner's OpenAI-compatible backend
and synthesis's teacher talk to such a server here; the key must appear in no
file they write and in nothing they print.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from repo_paths import REPO

from freelm.data import Problem
from freelm.redact import MASK, redact, redact_obj
from freelm.testing.http_server import LocalHTTPServer, QuietHandler
from freelm.training.teachers import OpenAITeacher, TeacherError

KEY_ENV = "FREELM_ECHO_TEST_KEY"


class EchoAuthServer(LocalHTTPServer):
    """``/v1/models`` answers; every POST echoes its Authorization header: a 401 body, or (``quote``) a 200 reply."""

    def __init__(self, quote: bool = False):
        self.quote = quote
        self.posts = 0


class _EchoHandler(QuietHandler):
    server_state: EchoAuthServer

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._send(200, {"object": "list", "data": [{"id": "judge", "object": "model", "owned_by": "test"}]})

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server_state.posts += 1
        auth = self.headers.get("Authorization")
        if self.server_state.quote and self.path.endswith("/chat/completions"):
            content = f"Your request carried Authorization: {auth} (raw: {auth.split()[-1]}). \\boxed{{Correct}}"
            self._send(200, {
                "id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })  # fmt: skip
            return
        message = f"invalid credentials: headers were {{'Authorization': '{auth}'}}; key {auth.split()[-1]}"
        self._send(401, {"error": {"message": message, "type": "invalid_request_error", "code": 401}})


EchoAuthServer.handler_class = _EchoHandler


@pytest.fixture
def key() -> str:
    return f"sk-echo-{uuid.uuid4().hex}"


def files_mentioning(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def run_cli(args: list[str], key: str) -> subprocess.CompletedProcess:
    env = {**os.environ, KEY_ENV: key, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "freelm.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)  # fmt: skip


def write_rollouts(path: Path) -> None:
    record = {
        "id": "1", "source": "s", "rollout": 0, "seed": 1, "answer": "5", "mode": "vanilla", "config_hash": "h",
        "response": "think</think>The answer is \\boxed{6}.", "finish_reason": "stop", "prompt_tokens": 1,
        "generated_tokens": 1, "final_context_tokens": 2, "peak_context_tokens": 2, "cleaning_rounds": 0,
        "wall_time_s": 0.0, "reasoning_time_s": 0.0, "cleaning_time_s": 0.0, "prompt": "What is 2+3?",
    }  # fmt: skip
    path.write_text(json.dumps(record) + "\n")


@pytest.mark.parametrize("quote", [False, True], ids=["error-body", "quoted-in-200"])
def test_judge_stores_and_prints_no_key(tmp_path, key, quote):
    write_rollouts(tmp_path / "run.jsonl")
    with EchoAuthServer(quote=quote) as server:
        proc = run_cli(
            ["judge", "--input", str(tmp_path / "run.jsonl"), "--output", str(tmp_path / "judge.jsonl"),
             "--base-url", f"{server.origin}/v1", "--model", "judge", "--api-key-env", KEY_ENV, "--max-retries", "0",
             "--no-progress"],
            key,
        )  # fmt: skip
    assert server.posts >= 1, proc.stderr
    line = json.loads((tmp_path / "judge.jsonl").read_text())
    stored = line["raw"] if quote else line["error"]
    assert MASK in stored and ("\\boxed{Correct}" in stored if quote else "invalid credentials" in stored)
    assert key not in proc.stdout + proc.stderr
    assert files_mentioning(tmp_path, key) == []


def test_runner_openai_backend_errors_and_manifest_hold_no_key(tmp_path, key, tiny_model_dir):
    data = tmp_path / "problems.jsonl"
    data.write_text(json.dumps({"id": 1, "prompt": "What is 2+3?", "answer": "5"}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["run", "--data", str(data), "--output", str(out), "--backend", "openai", "--served-model", "judge",
            "--api-key-env", KEY_ENV, "--tokenizer", str(tiny_model_dir), "--mode", "vanilla", "--max-tokens", "8",
            "--no-progress"]  # fmt: skip
    with EchoAuthServer() as server:
        probed = run_cli([*args, "--endpoint", server.origin], key)  # the startup probe meets the 401 first
        assert probed.returncode == 2 and "HTTP 401" in probed.stderr and MASK in probed.stderr
        assert key not in probed.stdout + probed.stderr and not out.exists()
        # --text-prompts: no probe, so the 401 reaches a rollout and its error record
        proc = run_cli([*args, "--endpoint", server.origin, "--text-prompts"], key)
    assert proc.returncode == 1, proc.stderr
    error = json.loads(Path(f"{out}.errors.jsonl").read_text().splitlines()[0])["error"]
    assert "HTTP 401" in error and MASK in error
    assert key not in proc.stdout + proc.stderr
    assert files_mentioning(tmp_path, key) == []


def test_teacher_error_text_holds_no_key(key):
    async def ask():
        teacher = OpenAITeacher(server.origin + "/v1", "judge", key, max_retries=0)
        try:
            await teacher.suggest(Problem("1", "s", "What is 2+3?", "5"), "thinking")
        finally:
            await teacher.aclose()

    with EchoAuthServer() as server, pytest.raises(TeacherError) as caught:
        asyncio.run(ask())
    assert "invalid credentials" in str(caught.value) and key not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__  # the openai error is not chained


def test_redact_patterns_catch_keys_the_process_never_knew():
    text = 'Authorization: Bearer abcdefgh12345678 {"api-key": "zzzzzzzz99"} Basic dXNlcjpwYXNzd29yZA== sk-abcdefghij'
    assert redact(text) == f'Authorization: Bearer {MASK} {{"api-key": "{MASK}"}} Basic {MASK} {MASK}'
    assert redact("Basic arithmetic gives 4; a bearer bond.") == "Basic arithmetic gives 4; a bearer bond."
    assert redact_obj({"a": ["x my-secret-value y"], "n": 3}, ["my-secret-value"]) == {"a": [f"x {MASK} y"], "n": 3}


def test_secret_environment_variables_are_redacted_everywhere(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "tok-1234567890")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM_PATH", "/models/Qwen3-8B")  # not a secret name
    assert redact("sent tok-1234567890 to /models/Qwen3-8B") == f"sent {MASK} to /models/Qwen3-8B"


# --------------------------------------------------------------------------- secrets inside secrets

#: A key and a shorter secret inside it (no credential pattern matches either: only the known values can catch them).
OUTER = "tenant-4f9c2e7a11b3d5e6-secret-7d"
INNER = "4f9c2e7a11b3d5e6"


@pytest.mark.parametrize("order", [[OUTER, INNER], [INNER, OUTER]], ids=["outer-first", "inner-first"])
def test_no_character_of_a_secret_containing_another_survives_in_either_order(order):
    text = f"upstream said: {OUTER}; then {INNER} alone"
    assert redact(text, order) == f"upstream said: {MASK}; then {MASK} alone"
    assert redact_obj({"error": [text]}, order) == {"error": [f"upstream said: {MASK}; then {MASK} alone"]}


@pytest.mark.parametrize("from_env", [INNER, OUTER])
def test_a_secret_from_the_environment_and_one_from_the_caller_nest_in_either_role(monkeypatch, from_env):
    monkeypatch.setenv("FREELM_NESTED_TEST_TOKEN", from_env)
    passed = OUTER if from_env == INNER else INNER
    assert redact(f"[{OUTER}]", [passed]) == f"[{MASK}]"


def test_overlapping_secrets_leave_no_character_of_either():
    """The end of one known secret is the start of another: whichever is replaced first, neither may leak."""
    first, second = "alpha-key-0123456789", "0123456789-beta-key"
    for order in ([first, second], [second, first]):
        assert redact("x alpha-key-0123456789-beta-key y", order) == f"x {MASK} y"
    assert redact("x" + "7" * 9 + "y", ["7" * 8]) == f"x{MASK}y"  # a secret overlapping itself


def test_known_secrets_from_eight_characters_are_redacted_shorter_ones_are_not(monkeypatch):
    assert redact("a 1x2y3z4w b", ["1x2y3z4w"]) == f"a {MASK} b"
    assert redact("a 1x2y3z4 b", ["1x2y3z4"]) == "a 1x2y3z4 b"  # seven characters: too likely to occur by chance
    monkeypatch.setenv("FREELM_SHORT_TEST_TOKEN", "9q8w7e6")
    monkeypatch.setenv("FREELM_LONG_TEST_TOKEN", "9q8w7e6r")
    assert redact("9q8w7e6 9q8w7e6r") == f"9q8w7e6 {MASK}"


def test_every_occurrence_is_redacted_at_either_end_of_the_text():
    key = "k3y-v4lu3-0123"
    assert redact(key + " and " + key, [key]) == f"{MASK} and {MASK}"
    assert redact(f"{key}, {key}, {key}.", [key]) == f"{MASK}, {MASK}, {MASK}."
    assert redact("", [key]) == "" and redact(key, [None, "", key]) == MASK
