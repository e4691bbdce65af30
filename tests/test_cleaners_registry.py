"""The cleaner registry: names, flags, hash parts and construction all come from one dataclass per cleaner."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from freelm.cleaners import registry
from freelm.cleaners.base import CleanOutcome
from freelm.cleaners.icl import ICLCleaner
from freelm.cleaners.lora import LoRACleaner
from freelm.cleaners.oracle import OracleCleaner
from freelm.free import remove_spans
from freelm.run.flags import build_parser, validate_args
from freelm.run.settings import run_settings
from freelm.run.spec import RunSpec

ARGV = ("--data", "d.jsonl", "--output", "o.jsonl")


def parse(*flags: str) -> RunSpec:
    return RunSpec.from_argv([*ARGV, *flags])


def check(*flags: str) -> None:
    validate_args(build_parser().parse_args([*ARGV, *flags]))


def test_every_cleaner_file_is_registered_under_its_name():
    assert registry.cleaner_names() == ["free", "headtail", "icl", "oracle"]
    assert registry.get_cleaner("icl").cls is ICLCleaner and registry.get_cleaner("oracle").cls is OracleCleaner
    assert [registry.get_cleaner(n).label for n in ("free", "headtail", "icl")] == ["freelm", "headtail", "icl"]
    with pytest.raises(ValueError, match="unknown cleaner 'nope'; expected one of free, headtail, icl, oracle"):
        registry.get_cleaner("nope")


def test_hashes_of_the_existing_cleaners_are_those_of_earlier_runs():
    """Outputs written before the registry must still resume: their config hashes are pinned here."""
    assert parse().settings.config_hash == "3094face88ebfc25"
    assert parse("--cleaner", "headtail").settings.config_hash == "ddd4beb233423f29"
    assert parse("--cleaner", "headtail", "--head-tokens", "4").settings.config_hash == "203c05735529e64b"
    assert parse("--adapter-name", "x", "--clean-max-tokens", "7").settings.config_hash == "15628d2cf3c093aa"


def test_icl_is_the_free_module_prompt_without_an_adapter():
    free, icl = parse().settings, parse("--cleaner", "icl").settings
    assert icl.mode == "icl" and icl.cleaner["name"] == "icl" and "adapter" not in icl.cleaner
    assert {k: v for k, v in free.cleaner.items() if k not in ("name", "adapter")} == {
        k: v for k, v in icl.cleaner.items() if k != "name"
    }
    assert parse("--cleaner", "icl", "--clean-max-tokens", "9").settings.cleaner["max_new_tokens"] == 9
    # the adapter name is not an ICL setting: changing it is no new ICL experiment
    assert parse("--cleaner", "icl", "--adapter-name", "x").settings.config_hash == icl.config_hash
    cleaner = registry.get_cleaner("icl").build(parse("--cleaner", "icl").cleaner_options, backend="B", tokenizer="T")
    assert isinstance(cleaner, LoRACleaner) and cleaner.adapter is None and cleaner.backend == "B"


def test_local_backend_needs_an_adapter_only_for_cleaners_that_use_one():
    local = ("--backend", "local", "--model", "m")
    with pytest.raises(ValueError, match="--cleaner free needs --adapter DIR"):
        check(*local)
    for name in ("icl", "oracle", "headtail"):
        check(*local, "--cleaner", name)


def test_oracle_has_no_settings_and_needs_no_component():
    entry = registry.get_cleaner("oracle")
    assert entry.components == [] and entry.settings == []
    assert parse("--cleaner", "oracle").settings.cleaner == {"name": "oracle"}
    assert isinstance(entry.build(parse("--cleaner", "oracle").cleaner_options), OracleCleaner)


def test_cleaner_flag_bounds_come_from_the_settings():
    for flag in ("--clean-max-tokens", "--head-tokens", "--tail-tokens"):
        with pytest.raises(ValueError, match=f"{flag} must be >= 1, got 0"):
            check("--endpoint", "h:1", "--tokenizer", "t", flag, "0")


def test_a_bad_template_fails_when_hashing_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="missing.txt"):
        run_settings(parse("--cleaner", "icl", "--clean-template", str(tmp_path / "missing.txt")))


@dataclass
class _Keep:
    budget: int = registry.setting(3, flag="--keep-budget", help="x")
    name: str = "keep_a"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        return CleanOutcome(edit=remove_spans(thinking, []))


@dataclass
class _KeepOther(_Keep):
    budget: int = registry.setting(4, flag="--keep-budget", help="x")
    name: str = "keep_b"


def test_two_cleaners_declaring_one_flag_differently_is_an_error(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(_Keep)
    parse("--cleaner", "keep_a", "--keep-budget", "5")  # one declaration: fine
    registry.register(_KeepOther)
    with pytest.raises(ValueError, match="cleaners 'keep_a' and 'keep_b' declare --keep-budget differently"):
        parse()


def test_register_refuses_what_the_runner_could_not_build(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @dataclass
    class NoName:
        async def clean(self, problem, thinking): ...

    @dataclass
    class Undefaulted:
        size: int
        name: str = "undefaulted"

        async def clean(self, problem, thinking): ...

    @dataclass
    class TakenName(_Keep):
        name: str = "free"

    with pytest.raises(TypeError, match="needs a `name: str = ...` field"):
        registry.register(NoName)
    with pytest.raises(TypeError, match="Undefaulted.size: neither a setting, a component nor defaulted"):
        registry.register(Undefaulted)
    with pytest.raises(ValueError, match="cleaner name 'free' is taken by LoRACleaner"):
        registry.register(TakenName)
    with pytest.raises(TypeError, match="a cleaner is a dataclass"):
        registry.register(type("NotADataclass", (), {"name": "x"}))


def test_icl_in_the_loop_asks_the_base_model_with_the_cleaning_prompt():
    """On the counting model the base model answers a cleaning prompt by counting on: no JSON, nothing deleted."""
    import asyncio

    from freelm.backends.base import GenerateRequest
    from freelm.loop import LoopConfig, run_rollout
    from freelm.testing.counting import CountingBackend, counting_tokenizer

    tokenizer = counting_tokenizer(30)
    requests: list[GenerateRequest] = []

    class Recording(CountingBackend):
        async def generate(self, request):
            requests.append(request)
            return await super().generate(request)

    backend = Recording(tokenizer, target=30)
    cleaner = registry.get_cleaner("icl").build(
        parse("--cleaner", "icl").cleaner_options, backend=backend, tokenizer=tokenizer
    )
    config = LoopConfig(clean_every=20, context_limit=4000, max_tokens=600)
    result = asyncio.run(
        run_rollout("Count to 30.", reasoner=backend, tokenizer=tokenizer, cleaner=cleaner, config=config)
    )
    cleanings = [r.clean for r in result.rounds if r.clean is not None]
    assert cleanings and all(c.cleaner == "icl" and c.parse_error and c.chars_deleted == 0 for c in cleanings)
    prompts = [r for r in requests if r.text is not None]
    assert prompts and all(r.adapter is None for r in requests) and all("Count to 30." in r.text for r in prompts)
