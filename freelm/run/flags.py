"""The runner's command line: every flag, its help, and the checks argparse cannot make.

This is the only layer that sees the argparse ``Namespace``: :mod:`freelm.run.spec`
turns it into a typed :class:`~freelm.run.spec.RunSpec` once, and everything
below reads that. The loop's and sampling's flags come from their settings
(:mod:`freelm.setting`: each field declares its flag, help, bounds and hash
key), the cleaners' from the cleaner registry and a backend's own flags from
its :class:`~freelm.backends.BackendKind`, so adding any of them never edits
this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlsplit

from freelm import setting
from freelm.backends import BackendFlag, backend_kinds, get_backend_kind
from freelm.cleaners import registry as cleaners
from freelm.loop import LoopConfig
from freelm.run.cleaning import add_rule_arguments, validate_rule_arguments
from freelm.shards import Shard

MODES = ("freelm", "vanilla")  # no cleaner is --mode vanilla, not a cleaner


EPILOG = """\
files:
  OUT                 one JSON line per finished rollout (freelm.records.RolloutRecord), fsynced as each ends
  OUT.manifest.json   full config, settings + config hash, package versions, times, counts, summary
  OUT.errors.jsonl    rollouts that failed (server down past --max-retries/--down-wait, HTTP 4xx);
                      they are not in OUT, so re-running the same command retries them

shards: with --num-shards N --shard-index I, OUT becomes OUT with .shard-I-of-N before its suffix
(runs/x.jsonl -> runs/x.shard-1-of-3.jsonl); eval_passk.py --input NAME=runs/x.jsonl reads all N together.

resume: re-running the same command skips every (source, id, rollout) already in OUT; a torn last
line (kill -9 mid-write) is dropped. Different results-deciding settings (mode, cleaner, budgets,
sampling, seed, local weights) are refused unless --force; endpoints, concurrency and timeouts may change.

cleaning: with --mode freelm the summary and the manifest count every cleaning round's outcome (applied,
nothing to delete, unresolved spans, parse errors by kind, failed calls by reason, no room); more than
--max-unusable-cleaning of the output's rounds without a usable deletion list flags the run (exit 3).

exit codes: 0 every rollout present; 1 some failed, or a write failed (re-run to retry); 2 bad input/config,
nothing sent; 3 the cleaner (nearly) never gave a usable deletion list: every rollout is kept and the run is
flagged, but re-running would not help (wrong template, adapter name or window: the message names the cause and
the check; it takes precedence over 1); 130 interrupted by Ctrl-C, 143 by SIGTERM (a scheduler's stop):
finished rollouts are kept, the manifest says "interrupted", and re-running the same command resumes."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults only where there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []):
            return action.help
        return super()._get_help_string(action)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every runner flag; shared by ``runner.py`` and ``freelm run``."""
    parser.formatter_class = _HelpFormatter
    parser.epilog = EPILOG
    g = parser.add_argument_group("data and output")
    g.add_argument(
        "--data",
        metavar="PATH_OR_HF_NAME",
        action="append",
        required=True,
        help="problem JSONL ({id, source, prompt, answer}), a glob of them, or a Hugging Face dataset name; "
        "repeatable: one run over every benchmark",
    )
    g.add_argument(
        "--split", metavar="NAME", default=None, help="dataset split for a Hugging Face name (default: test)"
    )
    g.add_argument("--limit", metavar="K", type=int, default=None, help="only the first K problems of each --data")
    g.add_argument(
        "--output",
        metavar="OUT",
        required=True,
        type=Path,
        help="output JSONL; OUT.manifest.json and OUT.errors.jsonl sit next to it",
    )
    g.add_argument("--n-rollouts", metavar="N", type=int, default=8, help="rollouts per problem")
    g.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=0,
        help="base seed; each rollout's seed derives from it, the problem and the rollout index",
    )
    g.add_argument(
        "--num-shards",
        metavar="N",
        type=int,
        default=1,
        help="split the (problem, rollout) jobs into N shards run by separate processes (a job array)",
    )
    g.add_argument(
        "--shard-index",
        metavar="I",
        type=int,
        default=0,
        help="the shard this process runs (0..N-1); it writes OUT with .shard-I-of-N before the suffix",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="if OUT was written with different settings, move it aside (OUT.replaced-TIMESTAMP) and start over",
    )

    g = parser.add_argument_group("backends (endpoints are never built in: pass them)")
    kinds = backend_kinds()
    g.add_argument(
        "--backend",
        choices=list(kinds),
        default="sglang",
        help="reasoner backend: " + "; ".join(f"{k.name} = {k.help}" for k in kinds.values()),
    )
    g.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="reasoner endpoint (repeatable; http:// optional)",
    )
    g.add_argument(
        "--endpoints-file",
        metavar="FILE",
        type=Path,
        help="file with one HOST:PORT per line (# comments); adds to --endpoint",
    )
    g.add_argument(
        "--cleaner-endpoint",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="cleaner endpoint(s) serving the adapter (repeatable; default: the reasoner endpoints)",
    )
    g.add_argument(
        "--cleaner-backend",
        choices=[name for name, kind in kinds.items() if kind.remote],
        default=None,
        help="backend of the --cleaner-endpoint servers (default: --backend, or sglang when that runs in-process)",
    )
    g.add_argument("--model", metavar="DIR", type=Path, help="--backend local: Hugging Face checkpoint directory")
    g.add_argument(
        "--adapter", metavar="DIR", type=Path, help="--backend local: PEFT adapter directory of the Free-Module"
    )
    g.add_argument(
        "--tokenizer",
        metavar="DIR",
        type=Path,
        help="the reasoner's tokenizer directory (default: --model); required for remote backends, the loop sends token ids",
    )
    added: dict[str, BackendFlag] = {}
    for kind in kinds.values():
        for flag in kind.flags:
            if added.get(flag.name) is flag:  # one declaration shared by several kinds (--served-model)
                continue
            added[flag.name] = flag
            g.add_argument(flag.name, help=flag.help, **flag.options)

    g = parser.add_argument_group("method")
    g.add_argument("--mode", choices=MODES, default="freelm", help="freelm: reason + clean; vanilla: reason only")
    g.add_argument(
        "--cleaner",
        choices=cleaners.cleaner_names(),
        default="free",
        help="with --mode freelm: one of freelm/cleaners/ (free = the LoRA Free-Module; docs/runner.md lists them all)",
    )
    cleaners.add_cleaner_arguments(g)
    setting.add_arguments(parser, g, LoopConfig)  # the loop's settings, and sampling's in a section of their own

    g = parser.add_argument_group("outcome checks (not part of the config hash)")
    add_rule_arguments(g)

    g = parser.add_argument_group("execution (not part of the config hash)")
    g.add_argument(
        "--concurrency",
        metavar="N",
        type=int,
        default=64,
        help="rollouts in flight (--backend local: also the largest decoding batch)",
    )
    g.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=600.0,
        help="seconds per request (one reasoning chunk or cleaning call)",
    )
    g.add_argument(
        "--max-retries",
        metavar="N",
        type=int,
        default=8,
        help="failed attempts of one request (each on another healthy endpoint) before its rollout fails",
    )
    g.add_argument(
        "--down-wait",
        metavar="SECONDS",
        type=float,
        default=600.0,
        help="seconds a request waits for any endpoint to become healthy again",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--skip-isolation-check",
        action="store_true",
        help="do not probe, before the first rollout, that a server answering both the reasoner and the cleaner's "
        "adapter keeps the adapter out of base-model requests batched with adapter requests (freelm/backends/isolation.py)",
    )


def build_parser(prog: str = "runner.py", description: str | None = None) -> argparse.ArgumentParser:
    """The parser ``runner.py`` uses (``freelm run`` adds the same flags to its subparser)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return parser


def normalize_endpoint(spec: str, where: str = "--endpoint") -> str:
    """``HOST:PORT`` or a URL -> ``http(s)://HOST:PORT[/path]``; anything else is a clear error."""
    text = spec.strip()
    url = text if "://" in text else f"http://{text}"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(f"{where}: bad endpoint {spec!r}: expected HOST:PORT (http:// or https:// optional)")
    return url.rstrip("/")


def read_endpoints_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read endpoints file ({exc})") from exc
    endpoints = []
    for number, line in enumerate(lines, start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            endpoints.append(normalize_endpoint(entry, f"{path}:{number}"))
    if not endpoints:
        raise ValueError(f"{path}: no endpoints in file")
    return endpoints


def validate_args(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot check; raises ValueError naming the flag."""
    for flag in ("n_rollouts", "concurrency"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    Shard(args.shard_index, args.num_shards)  # raises naming --shard-index and --num-shards
    cleaners.validate(vars(args))
    validate_rule_arguments(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_retries < 0:
        raise ValueError(f"--max-retries must be >= 0, got {args.max_retries}")
    if args.timeout <= 0 or args.down_wait <= 0:
        raise ValueError("--timeout and --down-wait must be > 0")
    setting.check(LoopConfig, vars(args))  # every loop and sampling bound, as declared on its field
    if args.resume != "reprefill" and args.mode != "vanilla" and not get_backend_kind(args.backend).evicts:
        evicting = ", ".join(k.name for k in backend_kinds().values() if k.evicts)
        raise ValueError(
            f"--resume {args.resume} needs an engine that evicts KV in place (--backend {evicting}); "
            f"--backend {args.backend} re-prefills (no server exposes eviction over HTTP): use --resume reprefill"
        )
    if not get_backend_kind(args.backend).remote:
        if args.model is None:
            raise ValueError(f"--backend {args.backend} needs --model DIR")
        if args.endpoint or args.endpoints_file:
            raise ValueError(f"--backend {args.backend} runs in-process: drop --endpoint/--endpoints-file")
        needs_adapter = args.mode == "freelm" and cleaners.get_cleaner(args.cleaner).adapter(vars(args)) is not None
        if needs_adapter and args.adapter is None and not args.cleaner_endpoint:
            raise ValueError(
                f"--backend {args.backend} with --cleaner {args.cleaner} needs --adapter DIR (or --cleaner-endpoint)"
            )
    else:
        if not (args.endpoint or args.endpoints_file):
            raise ValueError(f"--backend {args.backend} needs --endpoint HOST:PORT or --endpoints-file")
        if args.tokenizer is None and args.model is None:
            raise ValueError(f"--backend {args.backend} needs --tokenizer DIR (the loop sends token ids)")
    for kind in dict.fromkeys(k for k in (args.backend, args.cleaner_backend) if k):
        for flag in get_backend_kind(kind).needs:
            if not getattr(args, flag.lstrip("-").replace("-", "_")):
                raise ValueError(f"--backend/--cleaner-backend {kind} needs {flag}")
