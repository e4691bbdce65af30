"""The config hash covers every setting that changes results, checked flag by flag from the parser itself.

The runner refuses to resume an output written with other settings by comparing
hashes, so a results-deciding flag missing from the hash silently mixes two
experiments in one file. Instead of listing the flags that must matter (a new
one would be forgotten), every flag ``add_arguments`` defines is tried with
another value: it must change the hash in at least one mode, unless it is
declared here as not deciding results, with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from freelm.loop import LoopConfig
from freelm.prompts import DEFAULT_CLEAN_TEMPLATE
from freelm.run.flags import build_parser
from freelm.run.settings import settings_hash as raw_hash
from freelm.run.spec import RunSpec

#: Flags that choose what to run, where, or how fast: the same experiment either way.
NOT_RESULTS = {
    "help": "prints help",
    "data": "resume keys are (source, id, rollout): a different file only adds or skips problems",
    "split": "as --data",
    "limit": "as --data",
    "num_shards": "which share of the problems this process runs (each rollout keeps its own seed)",
    "shard_index": "as --num-shards",
    "output": "where the records go",
    "n_rollouts": "more rollouts of the same experiment (each keeps its own seed)",
    "force": "what to do on a mismatch",
    "endpoint": "servers may change between resumes",
    "endpoints_file": "as --endpoint",
    "cleaner_endpoint": "as --endpoint",
    "cleaner_backend": "as --backend",
    "tokenizer": "must be the served model's; the remote model is the operator's responsibility",
    "served_model": "as --tokenizer",
    "api_key_env": "a credential's location",
    "text_prompts": "how the prompt travels (its ids or their text; detected at startup when not given)",
    "max_unusable_cleaning": "judges the finished output's cleaning outcomes (exit 3), never changes a rollout",
    "accept_unusable_cleaning": "as --max-unusable-cleaning",
}
EXECUTION_GROUP = "execution (not part of the config hash)"


def spec(*flags: str) -> RunSpec:
    return RunSpec.from_argv(["--data", "d.jsonl", "--output", "o.jsonl", *flags])


def settings_hash(*flags: str) -> str:
    return spec(*flags).settings.config_hash


def alternative(action: argparse.Action, tmp_path: Path) -> list[str]:
    """Flags that set ``action`` to a value other than its default."""
    flag = action.option_strings[-1]
    if action.nargs == 0:  # store_true
        return [flag]
    if action.choices:  # the first other choice; --backend local is tried through the "local" mode
        return [flag, next(c for c in action.choices if c != action.default)]
    if action.dest == "shard_index":  # a shard index exists only with as many shards
        return [flag, "1", "--num-shards", "2"]
    if action.type is int:
        return [flag, str(3 if action.default is None else action.default + 1)]
    if action.type is float:
        return [flag, str(action.default + 0.01)]
    if action.type is Path:
        if action.dest == "clean_template":  # must be a valid template: same placeholders, other text
            path = tmp_path / "other_template.txt"
            path.write_text(DEFAULT_CLEAN_TEMPLATE.read_text() + "\nBe brief.\n")
            return [flag, str(path)]
        path = tmp_path / f"other_{action.dest}"
        if action.dest == "endpoints_file":  # read when the spec is made: must hold an endpoint
            path.write_text("h:2\n")
        return [flag, str(path)]
    if action.dest in ("endpoint", "cleaner_endpoint"):
        return [flag, "h:2"]
    return [flag, f"{action.default or ''} other"]


def contexts(tmp_path: Path) -> dict[str, list[str]]:
    """Every mode the hash is built in (each uses a different subset of the flags)."""
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "adapter").mkdir(exist_ok=True)
    return {
        "freelm": [],
        "headtail": ["--cleaner", "headtail"],
        "vanilla": ["--mode", "vanilla"],
        "local": ["--backend", "local", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter")],
    }


def runner_actions() -> list[tuple[argparse.Action, str]]:
    p = build_parser()
    return [(a, g.title) for g in p._action_groups for a in g._group_actions]


def test_every_flag_is_classified_and_the_declared_list_is_not_stale():
    dests = {a.dest for a, _ in runner_actions()}
    assert set(NOT_RESULTS) <= dests, f"declared but no longer a flag: {set(NOT_RESULTS) - dests}"


@pytest.mark.parametrize("dest", sorted({a.dest for a, _ in runner_actions()}))
def test_a_flag_changes_the_hash_iff_it_decides_results(dest, tmp_path):
    action, group = next((a, g) for a, g in runner_actions() if a.dest == dest)
    if dest == "help":
        return
    changed_in = []
    for name, base in contexts(tmp_path).items():
        try:
            if settings_hash(*base, *alternative(action, tmp_path)) != settings_hash(*base):
                changed_in.append(name)
        except ValueError as exc:  # the settings validate the template file only
            pytest.fail(f"{action.option_strings}: the alternative value is invalid: {exc}")
    if group == EXECUTION_GROUP or dest in NOT_RESULTS:
        assert changed_in == [], f"{action.option_strings} ({NOT_RESULTS.get(dest, group)}) changed the hash"
    else:
        assert changed_in, f"{action.option_strings} decides results but changes the hash in no mode"


def test_every_loop_setting_is_set_by_some_flag(tmp_path):
    """A LoopConfig field no flag reaches would be a setting the runner can never vary (nor hash)."""
    base = spec().loop
    reached: set[str] = set()
    for action, _ in runner_actions():
        if not action.option_strings or action.dest == "help":
            continue
        config = spec(*alternative(action, tmp_path)).loop
        for f in dataclasses.fields(LoopConfig):
            value, default = getattr(config, f.name), getattr(base, f.name)
            if dataclasses.is_dataclass(value):
                reached |= {
                    f"{f.name}.{g.name}"
                    for g in dataclasses.fields(value)
                    if getattr(value, g.name) != getattr(default, g.name)
                }
            elif value != default:
                reached.add(f.name)
    expected = set()
    for f in dataclasses.fields(LoopConfig):
        value = getattr(base, f.name)
        expected |= (
            {f"{f.name}.{g.name}" for g in dataclasses.fields(value)} if dataclasses.is_dataclass(value) else {f.name}
        )
    assert expected <= reached, f"no flag sets {sorted(expected - reached)}"


def test_the_cleaning_template_is_hashed_by_content_not_by_path(tmp_path):
    copy = tmp_path / "same.txt"
    copy.write_text(DEFAULT_CLEAN_TEMPLATE.read_text())
    assert settings_hash("--clean-template", str(copy)) == settings_hash()


def test_the_hash_is_of_the_content_not_the_key_order():
    one, two = {"a": 1, "b": {"x": 1, "y": 2}}, {"b": {"y": 2, "x": 1}, "a": 1}
    assert raw_hash(one) == raw_hash(two) and len(raw_hash(one)) == 16
    assert raw_hash(one) != raw_hash({**one, "a": 2})


def test_settings_record_the_mode_label_and_only_what_the_mode_uses(tmp_path):
    def settings(*flags: str):
        return spec(*flags).settings

    vanilla, free, headtail = settings("--mode", "vanilla"), settings(), settings("--cleaner", "headtail")
    assert (vanilla.mode, free.mode, headtail.mode) == ("vanilla", "freelm", "headtail")
    assert vanilla.cleaner is None and free.cleaner["name"] == "free" and headtail.cleaner["name"] == "headtail"
    assert free.model is None  # a remote server's weights are not the client's to hash
    model = tmp_path / "m"
    local = settings("--mode", "vanilla", "--backend", "local", "--model", str(model))
    assert local.model == {"model": str(model.resolve()), "adapter": None}


def test_hashes_are_those_of_earlier_runs():
    """Outputs written before the run package must resume without --force: values computed before it existed."""
    pinned = {
        (): "3094face88ebfc25",
        ("--mode", "vanilla"): "157df669f8e4c96e",
        ("--mode", "vanilla", "--clean-every", "7"): "157df669f8e4c96e",
        ("--backend", "local", "--model", "/m", "--adapter", "/a"): "00f5c04b38a0d557",
        ("--cleaner", "icl"): "38a2412c851053d6",
        ("--cleaner", "oracle"): "38abbc9a170a241e",
        ("--seed", "3", "--temperature", "0", "--max-tokens", "99", "--context-limit", "500",
         "--max-clean-rounds", "2", "--problem-suffix", "X"): "306814636ee88a8d",
    }  # fmt: skip
    assert {flags: settings_hash(*flags) for flags in pinned} == pinned
