"""Sharded runs: which shard owns a rollout, where a shard writes, and reading a run's shards back as one.

A run can be split over N client processes (a Slurm job array, several
machines) with ``--num-shards N --shard-index I``. Shard I runs exactly the
``(source, id, rollout)`` keys with ``(hash(source, id) + rollout) mod N == I``
(balanced: each shard gets ``n_rollouts / N`` rollouts of every problem, give or
take one); the assignment depends on nothing but the key, so it survives a grown ``--n-rollouts``/``--limit``, a
reordered ``--data`` list and resumption, and no two shards ever run the same
rollout. Each shard writes its own output (``OUT`` with ``.shard-I-of-N``
before the suffix) and manifest; evaluation reads them together and refuses a
set that is not exactly one run's N shards, because a missing shard silently
lowers pass@k's sample and a duplicated or foreign one mixes experiments.
"""

from __future__ import annotations

import glob
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from freelm.manifest import read_manifest
from freelm.records import RolloutRecord, read_rollouts

_SHARD_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``; ``Shard()`` is the whole run."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(
                f"--shard-index must be in 0..{self.count - 1} for --num-shards {self.count}, got {self.index}"
            )

    def owns(self, source: str, problem_id: str, rollout: int) -> bool:
        return self.count == 1 or shard_of(source, problem_id, rollout, self.count) == self.index

    def output(self, output: Path) -> Path:
        """Where this shard writes: ``runs/x.jsonl`` -> ``runs/x.shard-1-of-3.jsonl`` (unchanged for one shard)."""
        if self.count == 1:
            return Path(output)
        output = Path(output)
        return output.with_name(f"{output.stem}.shard-{self.index}-of-{self.count}{output.suffix}")

    def to_dict(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count}


def shard_of(source: str, problem_id: str, rollout: int, count: int) -> int:
    """A problem's rollouts go round-robin from a hashed start: every shard gets its share of every problem."""
    digest = hashlib.sha256(f"{source}\0{problem_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") + rollout) % count


# --------------------------------------------------------------------------- reading a run back


def run_files(spec: str | Path) -> list[Path]:
    """The file(s) a run name on the command line stands for.

    ``a.jsonl,b.jsonl`` is a list; a glob (``runs/x.shard-*.jsonl``) its sorted
    matches; a path that does not exist but has shards next to it
    (``runs/x.shard-I-of-N.jsonl``) stands for those shards; else the path itself.
    """
    files: list[Path] = []
    for part in str(spec).split(","):
        path = Path(part)
        if path.exists():
            files.append(path)
        elif set("*?[") & set(part):
            matches = sorted(glob.glob(part))
            if not matches:
                raise ValueError(f"{part}: no file matches this pattern")
            files.extend(map(Path, matches))
        else:
            shards = sorted(glob.glob(glob.escape(str(path.with_suffix(""))) + ".shard-*-of-*" + path.suffix))
            files.extend(map(Path, shards) if shards else [path])
    return files


def shard_of_file(path: Path) -> Shard | None:
    """The shard a runner output holds, from its manifest (else its name); None for an unsharded output."""
    manifest = read_manifest(path) or {}
    info = manifest.get("shard")
    if isinstance(info, dict) and isinstance(info.get("index"), int) and isinstance(info.get("count"), int):
        return Shard(info["index"], info["count"]) if info["count"] > 1 else None
    match = _SHARD_NAME.search(path.with_suffix("").name)
    return Shard(int(match[1]), int(match[2])) if match else None


def read_run(files: list[Path]) -> list[RolloutRecord]:
    """Every record of one run: a single output, or exactly the N shards of one sharded run.

    Raises ValueError naming the files for a missing, duplicated or
    mismatched shard (other shard count, other config hash, or a record whose
    key belongs to another shard), or an unsharded file mixed with shards.
    """
    for path in files:
        if not path.is_file():
            raise ValueError(f"{path}: runner output not found")
    if len(files) == 1 and shard_of_file(files[0]) is None:
        return read_rollouts(files[0])
    shards = {path: shard_of_file(path) for path in files}
    plain = [str(p) for p, s in shards.items() if s is None]
    if plain:
        raise ValueError(f"{', '.join(plain)}: not a shard (no shard in its manifest or name), given with other files")
    counts = sorted({s.count for s in shards.values()})
    if len(counts) > 1:
        listing = ", ".join(f"{p} ({s.index} of {s.count})" for p, s in shards.items())
        raise ValueError(f"shards of different runs (--num-shards {counts}): {listing}")
    count = counts[0]
    by_index: dict[int, Path] = {}
    for path, shard in shards.items():
        if shard.index in by_index:
            raise ValueError(f"shard {shard.index} of {count} given twice: {by_index[shard.index]} and {path}")
        by_index[shard.index] = path
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        some = next(iter(by_index.values()))
        expected = ", ".join(str(Shard(i, count).output(_unsharded(some))) for i in missing)
        raise ValueError(f"missing shard(s) {missing} of {count} (expected {expected})")
    records: list[RolloutRecord] = []
    hashes: dict[str, Path] = {}
    for index in range(count):
        path = by_index[index]
        manifest_hash = (read_manifest(path) or {}).get("config_hash")
        if isinstance(manifest_hash, str):  # an empty shard has no record to carry the hash
            hashes.setdefault(manifest_hash, path)
        for number, record in enumerate(read_rollouts(path), start=1):
            if shard_of(record.source, record.id, record.rollout, count) != index:
                raise ValueError(
                    f"{path}: record {number} ({record.source}, {record.id}, rollout {record.rollout}) "
                    f"belongs to shard {shard_of(record.source, record.id, record.rollout, count)}, not {index}"
                )
            hashes.setdefault(record.config_hash, path)
            records.append(record)
    if len(hashes) > 1:
        listing = ", ".join(f"{h} in {p}" for h, p in hashes.items())
        raise ValueError(f"shards written with different settings (config hash {listing}): not one run")
    return records


def run_stem(spec: str) -> str:
    """A run's default name: the stem of its (first) file without the shard part (``x.shard-*`` -> ``x``)."""
    return re.sub(r"\.shard-[^.]*$", "", Path(spec.split(",")[0]).stem)


def _unsharded(path: Path) -> Path:
    return path.with_name(run_stem(str(path)) + path.suffix)
