"""The paper-table path: scripts/reproduce_main.sh and reproduce_long_horizon.sh with a model config.

A config carries every results-deciding setting of the reasoner, the cleaner and
the engine, is checked before anything runs (exit 2 naming the variable and the
file) and is kept beside the outputs with its cleaning template. End to end, the
scripts run with ``configs/embedded.env`` against the SGLang-protocol stand-in
serving the embedded base model and Free-Module (``python -m freelm.smoke serve``),
through the released-adapter flow of docs/pipeline.md: ``freelm template infer``
on SFT rows -> the template path in the config -> the script.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from repo_paths import REPO
from sft_rows import disjoint_rows

from freelm.run.flags import build_parser

SCRIPTS = REPO / "scripts"
ASSETS = REPO / "freelm" / "assets" / "embedded"
EMBEDDED_ENV = REPO / "configs" / "embedded.env"
EMBEDDED_TEMPLATE = REPO / "freelm" / "demo" / "clean_template.txt"
DEFAULT_TEMPLATE = REPO / "freelm" / "templates" / "clean.txt"


def script(name: str, *args: str | Path, python: str | Path = sys.executable, timeout: float = 120):
    env = {**os.environ, "PYTHON": str(python), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout
    )


def embedded_config(folder: Path, name: str = "embedded.env", **overrides: str) -> Path:
    """``configs/embedded.env`` with some variables set again after it (its paths made absolute: another folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    values = {"CLEAN_TEMPLATE": str(EMBEDDED_TEMPLATE), "BENCHMARKS": f"counter={ASSETS / 'benchmark.jsonl'}"}
    values.update(overrides)
    path = folder / name
    path.write_text(EMBEDDED_ENV.read_text() + "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    return path


def recording_python(tmp_path: Path) -> tuple[Path, Path]:
    """A PYTHON for the scripts that records every runner / evaluation command instead of running it."""
    log, fake = tmp_path / "commands.jsonl", tmp_path / "python"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"if sys.argv[1] == '-c':\n    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n"
        f"with open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    return fake, log


def runner_calls(log: Path) -> list:
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return [build_parser().parse_args(c[1:]) for c in calls if c[0].endswith("runner.py")]


# --------------------------------------------------------------------------- the config reaches the runner


def test_every_setting_of_the_config_reaches_the_runner_and_the_template_is_kept(tmp_path):
    fake, log = recording_python(tmp_path)
    mine = tmp_path / "cfg" / "mine.txt"
    mine.parent.mkdir()
    mine.write_text(EMBEDDED_TEMPLATE.read_text())
    config = embedded_config(tmp_path / "cfg", CLEAN_TEMPLATE="mine.txt", LIMIT="3", MAX_CLEAN_ROUNDS="9")
    out = tmp_path / "out"
    result = script(
        "reproduce_main.sh", config, out, "--tokenizer", ASSETS / "base", "--endpoint", "h:1",
        "--backend", "openai", "--served-model", "embedded", python=fake,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    vanilla, freelm = runner_calls(log)
    assert (vanilla.mode, freelm.mode) == ("vanilla", "freelm")
    for args in (vanilla, freelm):
        assert args.clean_template == mine  # a relative path is read from the config's folder
        assert (args.backend, args.served_model, args.adapter_name) == ("openai", "embedded", "free")
        assert (args.clean_max_tokens, args.clean_reserve, args.clean_every, args.max_clean_rounds) == (48, 48, 32, 9)
        assert (args.temperature, args.top_p, args.top_k, args.min_p) == (0, 1, -1, 0)
        assert (args.n_rollouts, args.seed, args.max_tokens, args.context_limit) == (1, 0, 512, 216)
        assert (args.data, args.limit, args.concurrency) == ([str(ASSETS / "benchmark.jsonl")], 3, 16)
        assert args.endpoint == ["h:1"] and args.tokenizer == ASSETS / "base"
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    assert "--benchmarks" in commands[2] and commands[2][commands[2].index("--benchmarks") + 1] == "counter"
    assert commands[3][commands[3].index("--model") + 1] == "embedded"  # the efficiency preset

    # the copy beside the outputs reruns the same run: its template is the copy, the engine as given
    assert (out / "clean_template.txt").read_text() == EMBEDDED_TEMPLATE.read_text()
    copied = (out / "config.env").read_text()
    assert copied.startswith(config.read_text())
    assert "CLEAN_TEMPLATE=clean_template.txt" in copied and "BACKEND=openai" in copied
    again = script("reproduce_main.sh", out / "config.env", out, "--tokenizer", ASSETS / "base", "--endpoint", "h:1",
                   python=fake)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert runner_calls(log)[-1].clean_template == out / "clean_template.txt"

    # another template into the same folder would mix two experiments' files
    other = embedded_config(tmp_path / "cfg", "other.env", CLEAN_TEMPLATE=str(DEFAULT_TEMPLATE))
    mixed = script("reproduce_main.sh", other, out, "--tokenizer", ASSETS / "base", "--endpoint", "h:1", python=fake)
    assert mixed.returncode == 2 and "holds runs made with another cleaning template" in mixed.stderr


def test_the_shipped_embedded_config_is_complete_and_its_paths_resolve(tmp_path):
    fake, log = recording_python(tmp_path)
    out = tmp_path / "out"
    result = script(
        "reproduce_main.sh", EMBEDDED_ENV, out, "--tokenizer", ASSETS / "base", "--endpoint", "h:1", python=fake
    )
    assert result.returncode == 0, result.stderr
    freelm = runner_calls(log)[1]
    assert freelm.clean_template.resolve() == EMBEDDED_TEMPLATE and freelm.backend == "sglang"
    assert [Path(d).resolve() for d in freelm.data] == [ASSETS / "benchmark.jsonl"] and freelm.limit is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"CLEAN_TEMPLATE": "missing.txt"},
            "CLEAN_TEMPLATE=missing.txt: cannot read cleaning template {cfg}/missing.txt",
        ),
        ({"CLEAN_TEMPLATE": "adir"}, "CLEAN_TEMPLATE=adir: cannot read cleaning template {cfg}/adir"),  # unreadable
        ({"CLEAN_TEMPLATE": "broken.txt"}, "lacks placeholder(s): {{thinking}}"),
        ({"CLEAN_TEMPLATE": ""}, "CLEAN_TEMPLATE is not set"),
        ({"BACKEND": ""}, "BACKEND is not set"),
        ({"CLEAN_MAX_TOKENS": ""}, "CLEAN_MAX_TOKENS is not set"),
        ({"BENCHMARKS": "counter=nowhere.jsonl"}, "BENCHMARKS: file not found: {cfg}/nowhere.jsonl"),
    ],
)
def test_a_config_that_cannot_run_is_refused_before_anything_runs(tmp_path, overrides, message):
    fake, log = recording_python(tmp_path)
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "broken.txt").write_text("Clean this: {problem}\n")
    (cfg / "adir").mkdir()
    config = embedded_config(cfg, **overrides)
    for name, args in (("reproduce_main.sh", []), ("reproduce_long_horizon.sh", [tmp_path / "vanilla.jsonl"])):
        (tmp_path / "vanilla.jsonl").write_text("")
        result = script(name, config, *args, tmp_path / "out", "--tokenizer", "t", "--endpoint", "h:1", python=fake)
        assert result.returncode == 2, result.stderr
        assert message.format(cfg=cfg) in result.stderr and str(config) in result.stderr
        assert not (tmp_path / "out").exists() and not log.exists()  # nothing ran, nothing written


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("qwen3-*.env")), ids=lambda p: p.stem)
def test_the_paper_configs_need_the_released_adapters_template(config, tmp_path):
    """The released adapters' prompt is not the project's: without the recovered file the scripts say how to get it."""
    fake, _ = recording_python(tmp_path)
    if (REPO / "configs" / "freelm-upstream.txt").exists():
        pytest.skip("configs/freelm-upstream.txt exists in this working copy")
    result = script("reproduce_main.sh", config, tmp_path / "out", "--tokenizer", "t", "--endpoint", "h:1", python=fake)
    assert result.returncode == 2
    assert f"CLEAN_TEMPLATE=freelm-upstream.txt: cannot read cleaning template {REPO}/configs/freelm-upstream.txt" in (
        result.stderr
    )
    assert "freelm template infer --sft ROWS -o FILE" in result.stderr


# --------------------------------------------------------------------------- end to end on the embedded default

#: Problems of the main run (of 100): a subset keeps the test at a few minutes on 2 shared cores; the demo's
#: misses are problems 41, 57 and 65, so the first 10 are all solved by Free()LM at the tight limit.
PROBLEMS = 10


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The SGLang-protocol stand-in serving the embedded base model and its Free-Module as "free" (window 1024,
    the model's own, as SGLang serves it by default), on 127.0.0.1."""
    log = tmp_path_factory.mktemp("stand-in") / "server.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "freelm.smoke", "serve", "--model", str(ASSETS / "base"),
             "--adapter", str(ASSETS / "free"), "--window", "1024"],
            stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), log.read_text()
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the stand-in did not become healthy"
            time.sleep(0.5)
        yield url.removeprefix("http://")
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_the_released_adapter_flow_reproduces_the_embedded_table_and_a_wrong_template_is_flagged(stand_in, tmp_path):
    times = reproduce_embedded(stand_in, tmp_path, "--backend", "sglang")
    print(", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items()))


def reproduce_embedded(endpoint: str, tmp_path: Path, *engine: str) -> dict[str, float]:
    """The paper-table path on a server of the embedded model and Free-Module at ``endpoint`` (``engine``: the
    scripts' --backend / --served-model): the released-adapter flow, both scripts, and a wrong template flagged.

    Returns each script's wall time. A real-engine tier calls it with its own server.
    """
    # 1. the released-adapter flow: the template recovered from SFT rows, its path in the config
    cfg = tmp_path / "configs"
    cfg.mkdir()
    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in disjoint_rows(EMBEDDED_TEMPLATE.read_text()))
    )
    inferred = subprocess.run(
        [sys.executable, "-m", "freelm.cli", "template", "infer", "--sft", str(sft), "-o", str(cfg / "upstream.txt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert inferred.returncode == 0, inferred.stderr
    assert (cfg / "upstream.txt").read_text() == EMBEDDED_TEMPLATE.read_text()
    config = embedded_config(cfg, CLEAN_TEMPLATE="upstream.txt", LIMIT=str(PROBLEMS))

    # 2. the main table
    out = tmp_path / "main"
    started = time.monotonic()
    main = script("reproduce_main.sh", config, out, "--tokenizer", ASSETS / "base", "--endpoint", endpoint,
                  *engine, timeout=1800)  # fmt: skip
    main_s = time.monotonic() - started
    assert main.returncode == 0, main.stdout + main.stderr
    for name in ("table.md", "metrics.json", "accuracy_vs_tokens.png", "peak_context.png", "efficiency.md"):
        assert (out / name).stat().st_size > 0, name
    runs = {run["name"]: run["overall"] for run in json.loads((out / "metrics.json").read_text())["runs"]}
    assert runs["Free()LM"]["avg_at_n"] >= 0.8 and runs["Vanilla"]["avg_at_n"] <= 0.1, runs
    assert runs["Free()LM"]["problems"] == runs["Vanilla"]["problems"] == PROBLEMS
    table = (out / "table.md").read_text()
    assert table.index("| Vanilla |") < table.index("| Free()LM |")
    efficiency = json.loads((out / "efficiency.json").read_text())
    assert efficiency["model"]["name"] == "embedded" and efficiency["model"]["bytes_per_token"] == 1024
    kv = {row["name"]: row["kv_change"] for row in efficiency["runs"]}
    assert kv["Free()LM"] < -0.4  # the peak context, and so the KV cache, is less than 60% of vanilla's
    manifest = json.loads((out / "freelm.jsonl.manifest.json").read_text())
    assert manifest["cleaning"]["verdict"] == "ok"
    digest = hashlib.sha256(EMBEDDED_TEMPLATE.read_bytes()).hexdigest()
    assert manifest["settings"]["cleaner"]["template_sha256"] == digest  # the adapter's own prompt reached it

    # 3. the long-horizon subset: the first 4 problems' vanilla rollouts, rerun with Free()LM
    vanilla = tmp_path / "vanilla4.jsonl"
    vanilla.write_text("".join((out / "vanilla.jsonl").read_text().splitlines(keepends=True)[:4]))
    long_out = tmp_path / "long"
    started = time.monotonic()
    long = script("reproduce_long_horizon.sh", config, vanilla, long_out, "--tokenizer", ASSETS / "base",
                  "--endpoint", endpoint, *engine, timeout=1800)  # fmt: skip
    long_s = time.monotonic() - started
    assert long.returncode == 0, long.stdout + long.stderr
    assert "4 of 4 problems reach 160 generated tokens" in long.stderr
    subset = {run["name"]: run["overall"] for run in json.loads((long_out / "metrics.json").read_text())["runs"]}
    assert subset["Free()LM"]["avg_at_n"] >= 0.8 and subset["Vanilla"]["avg_at_n"] <= 0.1
    assert (long_out / "table.md").exists() and (long_out / "peak_context.png").exists()

    # 4. the same config with the project's default template: flagged, named, every rollout kept
    wrong = embedded_config(cfg, "wrong.env", CLEAN_TEMPLATE=str(DEFAULT_TEMPLATE), LIMIT="3")
    wrong_out = tmp_path / "wrong"
    wrong_out.mkdir()
    for name in ("vanilla.jsonl", "vanilla.jsonl.manifest.json"):  # the vanilla run is the same: resumed, not rerun
        shutil.copy(out / name, wrong_out / name)
    started = time.monotonic()
    flagged = script("reproduce_main.sh", wrong, wrong_out, "--tokenizer", ASSETS / "base", "--endpoint", endpoint,
                     *engine, timeout=1800)  # fmt: skip
    wrong_s = time.monotonic() - started
    assert flagged.returncode == 3, flagged.stdout + flagged.stderr
    assert f"template {DEFAULT_TEMPLATE} (the project's default)" in flagged.stderr
    assert "dominant reason parse_error:no_json_list" in flagged.stderr and "freelm template infer" in flagged.stderr
    assert "runner.py --mode freelm exited 3" in flagged.stderr and not (wrong_out / "table.md").exists()
    assert len((wrong_out / "freelm.jsonl").read_text().splitlines()) == 3  # every rollout kept
    return {
        f"reproduce_main.sh ({PROBLEMS} problems x 2 modes)": main_s,
        "reproduce_long_horizon.sh (4 problems)": long_s,
        "the flagged run (3 problems)": wrong_s,
    }
