"""freelm.setting: a setting is one field; its flag, help, bounds, constructor argument and hash key follow."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from freelm import setting
from freelm.backends.base import SamplingParams
from freelm.loop import LoopConfig
from freelm.run.flags import build_parser, validate_args
from freelm.run.settings import settings_hash
from freelm.run.spec import RunSpec
from freelm.setting import group

ARGV = ["--data", "d.jsonl", "--output", "o.jsonl", "--endpoint", "h:1", "--tokenizer", "t"]


def out_of_bounds(s: setting.Setting) -> str:
    """A value just outside the declared bounds (below the minimum, else above the maximum)."""
    if s.minimum is not None:
        return str(s.minimum if s.above else s.minimum - 1)
    return str(s.maximum + 1)


BOUNDED = [(f.name, s) for f, s in setting.flags(LoopConfig) if s.minimum is not None or s.maximum is not None]


def test_every_loop_and_sampling_setting_is_a_runner_flag():
    declared = {s.dest for _, s in setting.flags(LoopConfig)}
    assert declared == {
        "clean_every", "max_tokens", "context_limit", "max_clean_rounds", "problem_suffix", "resume",
        "temperature", "top_p", "top_k", "min_p",
    }  # fmt: skip
    parser_dests = {a.dest for a in build_parser()._actions}
    assert declared <= parser_dests


@pytest.mark.parametrize(("name", "s"), BOUNDED, ids=[name for name, _ in BOUNDED])
def test_every_bound_is_checked_before_anything_runs_and_the_error_names_the_flag(name, s):
    args = build_parser().parse_args([*ARGV, s.flag, out_of_bounds(s)])
    with pytest.raises(ValueError, match=rf"^{s.flag} must be "):
        validate_args(args)


def test_the_bound_messages_read_as_the_flags_always_did():
    def error(*flags: str) -> str:
        with pytest.raises(ValueError) as info:
            validate_args(build_parser().parse_args([*ARGV, *flags]))
        return str(info.value)

    assert error("--clean-every", "0") == "--clean-every must be >= 1, got 0"
    assert error("--max-clean-rounds", "-1") == "--max-clean-rounds must be >= 0, got -1"
    assert error("--top-p", "0") == "--top-p must be in (0, 1], got 0.0"
    assert error("--min-p", "1.5") == "--min-p must be in [0, 1], got 1.5"
    assert error("--temperature", "-1") == "--temperature must be >= 0, got -1.0"
    validate_args(build_parser().parse_args([*ARGV, "--top-p", "1", "--min-p", "0", "--max-clean-rounds", "0"]))


def test_a_direct_construction_is_checked_against_the_same_bounds_naming_the_field():
    with pytest.raises(ValueError, match=r"^LoopConfig.clean_every must be >= 1, got 0$"):
        LoopConfig(clean_every=0)
    with pytest.raises(ValueError, match=r"^LoopConfig.max_clean_rounds must be >= 0, got -2$"):
        LoopConfig(max_clean_rounds=-2)
    # a request's sampling is the server's to refuse (the in-process engine fails that request alone)
    assert SamplingParams(top_p=-1).top_p == -1


def test_the_spec_is_made_from_the_fields():
    loop = RunSpec.from_argv([*ARGV, "--clean-every", "7", "--top-k", "5", "--problem-suffix", "X"]).loop
    assert loop == LoopConfig(clean_every=7, problem_suffix="X", sampling=SamplingParams(top_k=5))


@dataclass(frozen=True)
class _Inner:
    depth: int = setting.setting(2, flag="--depth", minimum=1, help="how deep")


@dataclass(frozen=True)
class _Config:
    """A config as a later engineer extends it: ``strategy`` is the one new field."""

    budget: int = setting.setting(8, flag="--budget", metavar="N", minimum=1, help="tokens")
    rounds: int | None = setting.setting(None, flag="--rounds", type=int, minimum=0, cleaning=True, help="cap")
    inner: _Inner = group(_Inner, "inner settings")
    strategy: str = setting.setting(
        "reprefill", flag="--strategy", choices=("reprefill", "evict"), hash_default=False, help="how to resume"
    )


def test_a_new_results_deciding_setting_is_one_field():
    """Its flag (with choices), its bound, its constructor argument and its hash key all come from the field;
    at its default it is not hashed, so every hash written before it existed stays."""
    parser = argparse.ArgumentParser()
    setting.add_arguments(parser, parser.add_argument_group("main"), _Config)
    text = " ".join(parser.format_help().split())
    assert "--strategy {reprefill,evict} how to resume" in text and "inner settings: --depth N how deep" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--strategy", "nope"])
    default, evict = vars(parser.parse_args([])), vars(parser.parse_args(["--strategy", "evict", "--depth", "3"]))
    assert _Config(**setting.values(_Config, evict)) == _Config(inner=_Inner(3), strategy="evict")
    assert setting.config_of(_Config(**setting.values(_Config, default))) == {
        "budget": 8, "rounds": None, "inner": {"depth": 2}
    }  # fmt: skip
    assert setting.config_of(_Config(strategy="evict"))["strategy"] == "evict"
    assert setting.config_of(_Config(), cleaning=False) == {"budget": 8, "inner": {"depth": 2}}
    with pytest.raises(ValueError, match="^--depth must be >= 1, got 0$"):
        setting.check(_Config, {**default, "depth": 0})


def test_the_loop_hash_is_the_one_earlier_runs_stored():
    """Before the settings were declared on their fields, the loop was hashed as ``asdict(LoopConfig)``."""
    from dataclasses import asdict

    loop = LoopConfig(clean_every=9, max_clean_rounds=3, sampling=SamplingParams(top_k=4))
    earlier = {k: v for k, v in asdict(loop).items() if k != "resume"}  # added later: not hashed at its default
    assert setting.config_of(loop) == earlier
    assert settings_hash(setting.config_of(loop)) == settings_hash(earlier)
    assert setting.config_of(LoopConfig(resume="evict-gaps"))["resume"] == "evict-gaps"
