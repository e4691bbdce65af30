"""The trace viewer: history reconstruction, self-contained HTML, and a real render in headless Chromium."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from urllib.parse import urlparse

import pytest

from freelm.cleaners import FreeModuleCleaner
from freelm.cli import main as cli_main
from freelm.jsonl import append_jsonl
from freelm.loop import LoopConfig, run_rollout
from freelm.records import RolloutRecord
from freelm.testing.counting import CountingBackend, counting_tokenizer
from freelm.viewer import context_curve, find_record, render_html, trace_pieces


@pytest.fixture(scope="module")
def records() -> dict[str, RolloutRecord]:
    tok = counting_tokenizer(30)
    out = {}
    for mode, limit in (("vanilla", 4000), ("freelm", 120)):
        backend = CountingBackend(tok, target=30)
        cleaner = FreeModuleCleaner(backend) if mode == "freelm" else None
        result = asyncio.run(
            run_rollout(
                "Count to 30.",
                reasoner=backend,
                tokenizer=tok,
                cleaner=cleaner,
                config=LoopConfig(clean_every=25, context_limit=limit, max_tokens=4000),
            )
        )
        out[mode] = RolloutRecord.from_result(
            result,
            id="p1",
            source="toy",
            rollout=0,
            seed=0,
            answer="30",
            mode=mode,
            config_hash=mode,
            prompt="Count to 30.",
        )
    return out


def test_pieces_rebuild_the_kept_response_and_the_deleted_text(records):
    record = records["freelm"]
    pieces = trace_pieces(record)
    kept = "".join(p.text for p in pieces if p.deleted_in is None)
    assert kept == record.response
    deleted = "".join(p.text for p in pieces if p.deleted_in is not None)
    assert "step 1\n" in deleted and len(deleted) == sum(r.clean.chars_deleted for r in record.rounds if r.clean)


def test_context_curve_is_a_sawtooth_for_freelm(records):
    curve = context_curve(records["freelm"])
    drops = sum(1 for (x1, y1), (x2, y2) in zip(curve, curve[1:]) if x1 == x2 and y2 < y1)
    assert drops == records["freelm"].cleaning_rounds
    assert len(context_curve(records["vanilla"])) == 2


def test_html_is_self_contained(records):
    page = render_html(records["freelm"], [("vanilla", records["vanilla"])])
    assert "<del" in page and "deleted in round 0" in page
    assert not re.search(r"(src|href)\s*=|url\(|@import|<script", page)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_cli_writes_the_page(records, tmp_path):
    out = tmp_path / "run.jsonl"
    with out.open("a") as f:
        append_jsonl(f, records["freelm"].to_dict())
    page = tmp_path / "trace.html"
    assert cli_main(["view", str(out), "--id", "p1", "--rollout", "0", "-o", str(page)]) == 0
    assert "Rollout p1 #0" in page.read_text()
    with pytest.raises(SystemExit, match="no rollout"):
        cli_main(["view", str(out), "--id", "nope", "-o", str(page)])


def test_cli_keys_rollouts_by_source_too(records, tmp_path):
    """Ids repeat across benchmarks: an id in two sources needs --source; --compare looks up the same source."""
    from dataclasses import replace

    run = tmp_path / "run.jsonl"
    base = tmp_path / "base.jsonl"
    with run.open("a") as f, base.open("a") as g:
        for source in ("aime25", "beyond_aime"):
            append_jsonl(f, replace(records["freelm"], source=source).to_dict())
        for source in ("beyond_aime", "aime25"):
            append_jsonl(g, replace(records["vanilla"], source=source, prompt=f"{source} problem").to_dict())
    page = tmp_path / "trace.html"
    with pytest.raises(SystemExit, match="several sources .*aime25, beyond_aime.*--source"):
        cli_main(["view", str(run), "--id", "p1", "-o", str(page)])
    assert cli_main(["view", str(run), "--id", "p1", "--source", "beyond_aime", "-o", str(page)]) == 0
    assert "source beyond_aime" in page.read_text()
    args = ["view", str(run), "--id", "p1", "--source", "aime25", "--compare", str(base), "-o", str(page)]
    assert cli_main(args) == 0 and "vanilla (base.jsonl)" in page.read_text()
    assert find_record(base, "p1", 0, "beyond_aime").prompt == "beyond_aime problem"
    with pytest.raises(SystemExit, match="in source 'hmmt'"):
        find_record(run, "p1", 0, "hmmt")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_renders_in_headless_chromium_without_network(records, tmp_path):
    page = tmp_path / "trace.html"
    page.write_text(render_html(records["freelm"], [("vanilla", records["vanilla"])]))
    shot = tmp_path / "shot.png"
    log = tmp_path / "netlog.json"
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing this browser tries can leave the machine
        f"--user-data-dir={tmp_path / 'profile'}", f"--log-net-log={log}", "--window-size=1200,1600",
        f"--screenshot={shot}", page.as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    requested = set(re.findall(r'"url":"([^"]+)"', log.read_text())) if log.exists() else set()
    # Chromium's own services still ask (they cannot resolve: see host-resolver-rules); the page must ask nothing
    browser_services = ("update.googleapis.com", "clients2.google.com", "accounts.google.com", "www.google.com")
    from_page = [
        u for u in requested
        if u.startswith(("http:", "https:", "ws:", "wss:")) and urlparse(u).hostname not in browser_services
    ]  # fmt: skip
    assert not from_page, from_page
