"""The cleaner registry: names, flags, hash parts and construction all come from one dataclass per cleaner."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

import freelm.cleaners as cleaners_package
from freelm.backends.base import ContextWindow
from freelm.cleaners import registry
from freelm.cleaners.base import CleanOutcome
from freelm.cleaners.free_module import FreeModuleCleaner
from freelm.cleaners.icl import ICLCleaner
from freelm.cleaners.oracle import OracleCleaner
from freelm.cleaners.prompted import PromptedCleaner
from freelm.free import remove_spans
from freelm.manifest import manifest_path
from freelm.records import read_rollouts
from freelm.run.cli import main
from freelm.run.flags import build_parser, validate_args
from freelm.run.spec import RunSpec
from freelm.setting import setting

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
    assert isinstance(cleaner, ICLCleaner) and cleaner.adapter is None and cleaner.backend == "B"
    assert not isinstance(cleaner, FreeModuleCleaner)  # they share the prompted call, not a lineage
    assert isinstance(cleaner, PromptedCleaner) and ICLCleaner.clean is FreeModuleCleaner.clean


def test_the_adapter_a_cleaner_calls_is_its_declared_field_not_its_class():
    entries = {name: registry.get_cleaner(name) for name in registry.cleaner_names()}
    assert {name: e.calls_model for name, e in entries.items()} == {
        "free": True, "headtail": False, "icl": True, "oracle": False
    }  # fmt: skip
    assert entries["free"].adapter(parse().cleaner_options) == "free"
    assert entries["free"].adapter(parse("--adapter-name", "x").cleaner_options) == "x"
    assert [entries[n].adapter(parse().cleaner_options) for n in ("icl", "headtail", "oracle")] == [None] * 3
    assert parse("--adapter-name", "x").cleaner_adapter == "x"
    assert parse("--mode", "vanilla").cleaner_adapter is None and parse("--cleaner", "icl").cleaner_adapter is None


def test_every_component_is_declared_and_handed_over_by_the_registry():
    """``window`` is learned from the servers after the cleaner is built: the registry hands it over, by name."""
    free = registry.get_cleaner("free")
    assert free.components == ["backend", "window", "tokenizer"] and free.required_components == ["backend"]
    cleaner = free.build(parse().cleaner_options, backend="B", tokenizer="T", unrelated="ignored")
    assert cleaner.window is None and cleaner.tokenizer == "T"
    window = ContextWindow(100, 120, "test")
    free.hand_over(cleaner, window=window)
    assert cleaner.window is window
    headtail = registry.get_cleaner("headtail")
    with pytest.raises(ValueError, match="cleaner 'headtail' declares no component 'window'"):
        headtail.hand_over(headtail.build(parse().cleaner_options, tokenizer="T"), window=window)
    with pytest.raises(ValueError, match="cleaner 'headtail' needs tokenizer"):
        headtail.build(parse().cleaner_options)


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
        parse("--cleaner", "icl", "--clean-template", str(tmp_path / "missing.txt")).settings  # noqa: B018


@dataclass
class _Keep:
    budget: int = setting(3, flag="--keep-budget", help="x")
    name: str = "keep_a"

    async def clean(self, problem: str, thinking: str) -> CleanOutcome:
        return CleanOutcome(edit=remove_spans(thinking, []))


@dataclass
class _KeepOther(_Keep):
    budget: int = setting(4, flag="--keep-budget", help="x")
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
    with pytest.raises(ValueError, match="cleaner name 'free' is taken by FreeModuleCleaner"):
        registry.register(TakenName)
    with pytest.raises(TypeError, match="a cleaner is a dataclass"):
        registry.register(type("NotADataclass", (), {"name": "x"}))

    @dataclass
    class Silent:
        backend: object
        name: str = "silent"

        async def clean(self, problem, thinking): ...

    with pytest.raises(TypeError, match=r"Silent: a cleaner that calls a model \(a `backend` component\) declares"):
        registry.register(Silent)


#: A whole cleaner in one file, as a contributor would add it to freelm/cleaners/: it asks its model (with
#: its own adapter) for the deletions, and brings two flags.
ASKING_CLEANER = """
from dataclasses import dataclass

from freelm.backends.base import Backend, ContextWindow, GenerateRequest
from freelm.cleaners.base import CleanOutcome
from freelm.cleaners.registry import register
from freelm.setting import setting
from freelm.free import apply_deletions, parse_commands


@register(label="asked")
@dataclass
class AskingCleaner:
    backend: Backend
    adapter: str | None = setting("asked", flag="--asker-adapter", metavar="NAME", help="the adapter it asks")
    budget: int = setting(64, flag="--asker-budget", minimum=1, help="tokens of one answer")
    window: ContextWindow | None = None
    name: str = "asker"

    async def clean(self, problem, thinking):
        budget = min(self.budget, self.window.max_total) if self.window else self.budget
        request = GenerateRequest(text=thinking, max_new_tokens=budget, adapter=self.adapter)
        result = await self.backend.generate(request)
        commands = parse_commands(result.text)
        return CleanOutcome(edit=apply_deletions(thinking, commands), raw_output=result.text)
"""


def test_a_new_cleaner_is_one_file_and_runs_through_runner_py(drop_module, counting_kind, tmp_path, capsys):
    """The file alone: --cleaner offers it, its flags exist and are checked, its settings are hashed, it runs."""
    drop_module(cleaners_package, registry, "asking", ASKING_CLEANER)
    assert "asker" in registry.cleaner_names() and registry.get_cleaner("asker").adapter({"asker_adapter": "a"}) == "a"
    text = " ".join(build_parser().format_help().split())
    assert "--asker-budget N --cleaner asker: tokens of one answer" in text
    with pytest.raises(ValueError, match="--asker-budget must be >= 1, got 0"):
        check("--endpoint", "h:1", "--tokenizer", "t", "--asker-budget", "0")
    data, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": "Count to 30.", "answer": "30"}) + "\n" for i in range(2)))
    common = ["--data", str(data), "--output", str(out), "--n-rollouts", "1", "--no-progress", "--backend", "counting"]
    flags = ["--model", str(tmp_path / "m"), "--cleaner", "asker", "--asker-budget", "48"]
    budgets = ["--clean-every", "20", "--context-limit", "400", "--max-tokens", "600"]
    assert main([*common, *flags, *budgets]) == 2  # an in-process engine must load the adapter it asks
    assert "--cleaner asker needs --adapter DIR" in capsys.readouterr().err
    assert main([*common, *flags, *budgets, "--adapter", str(tmp_path / "a")]) == 0
    records = read_rollouts(out)
    assert all(r.mode == "asked" and r.cleaning_rounds > 0 for r in records)
    assert all(c.chars_deleted > 0 for r in records for c in (round.clean for round in r.rounds) if c)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["settings"]["cleaner"] == {"name": "asker", "adapter": "asked", "budget": 48}


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
