"""Getting a benchmark's upstream files: the Hugging Face Hub, a GitHub commit, or a local copy (``--from``).

Without network access this fails at once. ``huggingface_hub`` retries a
refused connection with back-off for about 30 s before giving up, so before any
download a single probe (``HfApi.dataset_info``, one request, no retries,
``PROBE_TIMEOUT``) decides whether the Hub answers; when it does not, a copy
already in the Hugging Face cache is used, and otherwise the error names the
benchmark and the ways out (network, ``HF_HUB_OFFLINE`` with a cache filled
elsewhere, ``--from``). ``HF_HUB_OFFLINE=1`` reads the cache only, and freelm
also takes it as "no network" for the GitHub-only benchmark.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from freelm.benchmarks.sources import Benchmark, Source

#: Seconds to wait for the probe request (connect and answer).
PROBE_TIMEOUT = 10.0
GITHUB_RAW = "https://raw.githubusercontent.com"
_COMMIT = re.compile(r"[0-9a-f]{40}")


class FetchError(RuntimeError):
    """A source that cannot be fetched; ``network``: the host is unreachable, so later downloads would fail too."""

    def __init__(self, message: str, *, network: bool = False) -> None:
        super().__init__(message)
        self.network = network


@dataclass(frozen=True)
class Fetched:
    """Upstream files on local disk: ``files`` are paths relative to ``root``, in reading order."""

    root: Path
    files: list[str]
    #: The upstream commit the files are from; None for a local copy of unknown commit.
    commit: str | None
    #: "hub", "hub-cache", "github" or "local:DIR".
    origin: str


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def select_files(paths: Iterable[str], source: Source) -> list[str]:
    """The files of the first pattern in ``source.files`` that matches any path (``exclude`` applied first)."""
    candidates = [p for p in paths if not any(fnmatchcase(p, pattern) for pattern in source.exclude)]
    for pattern in source.files:
        hits = sorted(p for p in candidates if fnmatchcase(p, pattern))
        if hits:
            return hits
    return []


def fetch(bench: Benchmark, revision: str, workdir: Path, local_dir: str | Path | None = None) -> Fetched:
    """The upstream files of ``bench`` at ``revision``; ``workdir`` holds downloads no library caches."""
    if local_dir is not None:
        fetched = _from_local(bench, Path(local_dir))
    elif bench.source.host == "hf":
        fetched = _from_hub(bench, revision)
    elif bench.source.host == "github":
        fetched = _from_github(bench, revision, workdir)
    else:
        raise FetchError(f"{bench.name}: unknown source host {bench.source.host!r}")
    _check_pinned_hash(bench, revision, fetched)
    return fetched


def _check_pinned_hash(bench: Benchmark, revision: str, fetched: Fetched) -> None:
    expected = bench.source.sha256
    if expected is None or revision != bench.source.revision or len(fetched.files) != 1:
        return
    actual = sha256_file(fetched.root / fetched.files[0])
    if actual != expected:
        raise FetchError(
            f"{bench.name}: {fetched.files[0]} ({fetched.origin}) has SHA-256 {actual}, but the file at the pinned "
            f"revision {revision} has {expected}; use a copy of that revision or pass --revision {bench.name}=REV"
        )


def _no_match(bench: Benchmark, where: str) -> FetchError:
    return FetchError(f"{bench.name}: no file in {where} matches {' or '.join(bench.source.files)}")


def _from_local(bench: Benchmark, root: Path) -> Fetched:
    if not root.is_dir():
        raise FetchError(f"{bench.name}: --from directory {root} does not exist")
    files = select_files(_walk(root), bench.source)
    if not files:
        raise _no_match(bench, str(root))
    return Fetched(root=root, files=files, commit=None, origin=f"local:{root}")


def _what_to_do(bench: Benchmark, revision: str) -> str:
    source = bench.source
    return (
        f"On a machine with internet access run `freelm data prepare {bench.name}` and copy the output folder "
        f"here; or fill the Hugging Face cache there (`hf download {source.repo} --repo-type dataset "
        f"--revision {revision}`) and set HF_HUB_OFFLINE=1 here to use it; or pass --from {bench.name}=DIR "
        "with a local copy of the dataset repository."
    )


def _gated(bench: Benchmark) -> FetchError:
    return FetchError(
        f"{bench.name}: {bench.source.repo} is gated: log in at {bench.source.url()}, accept its terms, then run "
        "`hf auth login` (or export HF_TOKEN) and rerun."
    )


def _from_hub(bench: Benchmark, revision: str) -> Fetched:
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants, errors
    except ImportError as exc:
        raise FetchError(f"{bench.name}: downloading needs huggingface_hub: pip install 'freelm[hub]'") from exc
    source = bench.source
    what = f"{bench.name}: {source.repo} at {revision}"
    if constants.HF_HUB_OFFLINE:
        cached = _hub_cache(hub, bench, revision)
        if cached is None:
            raise FetchError(
                f"{what}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it. "
                f"Unset HF_HUB_OFFLINE where there is internet access. {_what_to_do(bench, revision)}"
            )
        return cached
    commit = revision if _COMMIT.fullmatch(revision) else None
    try:
        info = hub.HfApi().dataset_info(source.repo, revision=revision, timeout=PROBE_TIMEOUT)
        commit = info.sha or commit
    except errors.RevisionNotFoundError as exc:
        raise FetchError(f"{what}: no such revision on the Hub; pass --revision {bench.name}=REV") from exc
    except errors.GatedRepoError as exc:
        raise _gated(bench) from exc
    except errors.RepositoryNotFoundError as exc:
        raise FetchError(f"{what}: dataset not found on the Hub (or private: log in)") from exc
    except Exception as exc:  # refused, DNS, timeout, proxy, Hub error: one request, no retries
        cached = _hub_cache(hub, bench, commit or revision)
        if cached is not None:
            return cached
        raise FetchError(
            f"{what}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} "
            f"({type(exc).__name__}: {exc}), and it is not in the local cache. Check the network, HF_ENDPOINT "
            f"and any proxy. {_what_to_do(bench, revision)}",
            network=True,
        ) from exc
    try:
        root = _snapshot(hub, source, commit or revision, local_files_only=False)
    except errors.GatedRepoError as exc:
        raise _gated(bench) from exc
    except errors.LocalEntryNotFoundError as exc:
        raise FetchError(f"{what}: download failed ({exc}). {_what_to_do(bench, revision)}", network=True) from exc
    except errors.HfHubHTTPError as exc:
        raise FetchError(f"{what}: the Hub refused the download ({exc})") from exc
    return _hub_fetched(bench, root, commit, "hub")


def _snapshot(hub, source: Source, revision: str, *, local_files_only: bool) -> Path:
    """``snapshot_download`` of just the files ``source`` may read; returns the snapshot folder."""
    return Path(
        hub.snapshot_download(
            source.repo,
            repo_type="dataset",
            revision=revision,
            allow_patterns=list(source.files),
            ignore_patterns=list(source.exclude) or None,
            local_files_only=local_files_only,
        )
    )


def _hub_cache(hub, bench: Benchmark, revision: str) -> Fetched | None:
    """The cached snapshot of ``bench``'s source at ``revision``, or None."""
    try:
        root = _snapshot(hub, bench.source, revision, local_files_only=True)
    except Exception:  # nothing usable cached: the caller reports why it could not download
        return None
    return _hub_fetched(bench, root, None, "hub-cache")


def _walk(root: Path) -> list[str]:
    """The files below ``root`` as repository paths (``a/b.parquet``), git and cache folders left out."""
    paths = (path.relative_to(root) for path in root.rglob("*") if path.is_file())
    return [path.as_posix() for path in paths if not {".git", ".cache"} & set(path.parts)]


def _hub_fetched(bench: Benchmark, root: Path, commit: str | None, origin: str) -> Fetched:
    files = select_files(_walk(root), bench.source)
    if not files:
        raise _no_match(bench, f"{bench.source.repo} ({root})")
    # a cache snapshot folder is named by its commit
    commit = commit or (root.name if _COMMIT.fullmatch(root.name) else None)
    return Fetched(root=root, files=files, commit=commit, origin=origin)


def _from_github(bench: Benchmark, revision: str, workdir: Path) -> Fetched:
    from huggingface_hub import constants

    source = bench.source
    path = source.files[0]
    url = f"{GITHUB_RAW}/{source.repo}/{revision}/{path}"
    local_hint = (
        f"download {url} and pass --from {bench.name}=DIR (DIR holding {path}, e.g. a checkout of {source.repo})"
    )
    if constants.HF_HUB_OFFLINE:
        raise FetchError(
            f"{bench.name}: published on GitHub ({source.repo}), and HF_HUB_OFFLINE=1 is set, which freelm takes "
            f"as 'no network'. Unset it where there is internet access, or {local_hint}."
        )
    import httpx

    try:
        response = httpx.get(url, timeout=httpx.Timeout(60.0, connect=PROBE_TIMEOUT), follow_redirects=True)
    except httpx.TransportError as exc:
        raise FetchError(
            f"{bench.name}: cannot reach {GITHUB_RAW} ({type(exc).__name__}: {exc}). Check the network and any "
            f"proxy, run `freelm data prepare {bench.name}` where there is internet access, or {local_hint}.",
            network=True,
        ) from exc
    if response.status_code != 200:
        raise FetchError(f"{bench.name}: GET {url} answered HTTP {response.status_code}")
    target = workdir / bench.name / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(response.content)
    return Fetched(root=workdir / bench.name, files=[path], commit=revision, origin="github")


__all__ = ["GITHUB_RAW", "PROBE_TIMEOUT", "FetchError", "Fetched", "fetch", "select_files", "sha256_file"]
