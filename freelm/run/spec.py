"""One run's every choice, typed and frozen: :class:`RunSpec`, made once from the parsed flags.

Why a spec and not the ``Namespace``: the flags are read in one place (here),
derived values (the shard's output file, the endpoint list, the loop config,
the cleaner's backend) are computed once, and everything below the command
line (settings, components, planning, the batch) takes typed fields it can
rely on. A cleaner's or a backend's own flags travel as
``cleaner_options``/``backend_options`` (flag destination -> value), read by
the registry entry that declared them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from freelm import setting
from freelm.backends import backend_kinds, get_backend_kind
from freelm.cleaners import registry as cleaners
from freelm.loop import LoopConfig
from freelm.run.cleaning import CleaningRule
from freelm.run.flags import build_parser, normalize_endpoint, read_endpoints_file
from freelm.run.settings import RunSettings
from freelm.shards import Shard


@dataclass(frozen=True)
class RunSpec:
    """What to run, where, and how fast; ``settings`` is the results-deciding part (hashed)."""

    # data and output
    data: tuple[str, ...]
    split: str | None
    limit: int | None
    output: Path  # this shard's own file
    n_rollouts: int
    seed: int
    shard: Shard
    force: bool
    # backends
    backend: str
    endpoints: tuple[str, ...]  # --endpoint and --endpoints-file, normalized, each once
    cleaner_endpoints: tuple[str, ...]
    cleaner_backend: str  # --cleaner-backend, else --backend, else sglang (when --backend runs in-process)
    model: Path | None
    adapter: Path | None
    tokenizer: Path | None  # --tokenizer, else --model
    backend_options: dict[str, Any]  # the backend kinds' own flags
    # method
    mode: str
    cleaner: str
    cleaner_options: dict[str, Any]  # every registered cleaner's flags
    loop: LoopConfig
    cleaning_rule: CleaningRule  # when the output's cleaning outcomes flag the run (judges results, never changes them)
    # execution (not hashed)
    concurrency: int
    timeout: float
    max_retries: int
    down_wait: float
    progress: bool | None  # None: a bar only on a terminal
    flags: dict[str, Any]  # every flag as given (Paths as text): the manifest's "config"
    isolation_check: bool = True  # probe servers answering both modes for adapter leaks (freelm.run.isolation)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunSpec:
        """The spec of parsed flags; raises ValueError for a bad endpoint. ``validate_args`` checks the rest."""
        shard = Shard(args.shard_index, args.num_shards)
        output = shard.output(args.output)  # each shard its own files
        endpoints = [normalize_endpoint(e) for e in args.endpoint]
        if args.endpoints_file:
            endpoints += read_endpoints_file(args.endpoints_file)
        remote = get_backend_kind(args.backend).remote
        flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")}
        return cls(
            data=tuple(args.data), split=args.split, limit=args.limit, output=output, n_rollouts=args.n_rollouts,
            seed=args.seed, shard=shard, force=args.force,
            backend=args.backend, endpoints=tuple(dict.fromkeys(endpoints)),
            cleaner_endpoints=tuple(dict.fromkeys(normalize_endpoint(e, "--cleaner-endpoint") for e in args.cleaner_endpoint)),
            cleaner_backend=args.cleaner_backend or (args.backend if remote else "sglang"),
            model=args.model, adapter=args.adapter, tokenizer=args.tokenizer or args.model,
            backend_options={f.dest: getattr(args, f.dest) for kind in backend_kinds().values() for f in kind.flags},
            mode=args.mode, cleaner=args.cleaner,
            cleaner_options={
                s.dest: getattr(args, s.dest) for name in cleaners.cleaner_names()
                for _, s in cleaners.get_cleaner(name).flags
            },
            loop=LoopConfig(**setting.values(LoopConfig, vars(args))),
            cleaning_rule=CleaningRule.from_args(args),
            concurrency=args.concurrency, timeout=args.timeout, max_retries=args.max_retries,
            down_wait=args.down_wait, progress=False if args.no_progress else None,
            flags={**flags, "output": str(output)}, isolation_check=not args.skip_isolation_check,
        )  # fmt: skip

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> RunSpec:
        """``runner.py``'s flags as a spec, unchecked by ``validate_args`` (benchmarks, tests)."""
        return cls.from_args(build_parser().parse_args(list(argv)))

    @cached_property
    def settings(self) -> RunSettings:
        """What decides results, computed once; raises ValueError on a bad value (a cleaner's template file)
        before any output exists."""
        # a vanilla run leaves out the loop settings only cleaning uses: changing them is no new experiment
        loop = setting.config_of(self.loop, cleaning=self.mode != "vanilla")
        cleaner: dict[str, Any] | None = None
        mode = "vanilla"
        if self.mode != "vanilla":
            entry = cleaners.get_cleaner(self.cleaner)
            mode = entry.label
            cleaner = entry.config(self.cleaner_options)  # validates files (a template) before any request
        model = None
        if not self.remote:  # a remote server's weights are the operator's responsibility
            model = {
                "model": str(self.model.resolve()) if self.model else None,
                "adapter": str(self.adapter.resolve()) if self.adapter else None,
            }
        return RunSettings(mode=mode, seed=self.seed, loop=loop, cleaner=cleaner, model=model)

    @property
    def remote(self) -> bool:
        return get_backend_kind(self.backend).remote

    @property
    def cleaner_adapter(self) -> str | None:
        """The adapter the run's cleaner calls (its declared ``adapter``); None: vanilla, the base model, or no model."""
        if self.mode != "freelm":
            return None
        return cleaners.get_cleaner(self.cleaner).adapter(self.cleaner_options)
