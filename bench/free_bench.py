"""Benchmark the free() executor on long thinking texts.

Applies 20 deletion commands to a synthetic thinking text of ~128k tokens
(~500 KB; ~4 characters per token) and prints the time per call, its ratio to
one full ``str.find`` pass over the same text (the unavoidable cost of looking
at the text once), and the 128k/32k time ratio (linear scaling gives ~4).

    python bench/free_bench.py
"""

from __future__ import annotations

import random
import time

from freelm.free import Deletion, apply_deletions, format_commands, parse_commands

CHARS_PER_TOKEN = 4


def make_text(tokens: int, seed: int = 0) -> tuple[str, list[Deletion]]:
    """Numbered reasoning lines (unique anchors) and 20 commands spread over the text."""
    rng = random.Random(seed)
    lines, size, n = [], 0, 0
    while size < tokens * CHARS_PER_TOKEN:
        line = f"Step {n}: we have x_{n} = {rng.randint(0, 10**6)}, so the next value follows. Check it again.\n"
        lines.append(line)
        size += len(line)
        n += 1
    starts = sorted(rng.sample(range(n - 5), 20))
    commands = [Deletion(f"Step {s}: ", f"x_{s + 3} = ") for s in starts]
    return "".join(lines), commands


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(tokens: int, repeat: int = 7) -> tuple[float, float, int]:
    text, commands = make_text(tokens)
    raw = format_commands(commands)
    edit = apply_deletions(text, parse_commands(raw))
    assert not edit.skipped, edit.skipped
    t_apply = best_time(lambda: apply_deletions(text, parse_commands(raw)), repeat)
    t_find = best_time(lambda: text.find("\x00never\x00"), repeat)
    return t_apply, t_find, len(text)


def main() -> None:
    results = {}
    for tokens in (32_000, 128_000):
        t_apply, t_find, size = measure(tokens)
        results[tokens] = t_apply
        print(
            f"{tokens // 1000:>4}k tokens ({size / 1e3:,.0f} KB): parse+apply 20 commands {t_apply * 1e3:8.3f} ms/call; "
            f"one str.find pass {t_find * 1e3:6.3f} ms; ratio {t_apply / t_find:6.1f}x"
        )
    scale = results[128_000] / results[32_000]
    print(f"scaling 128k/32k: {scale:.2f}x time for 4x text (linear = 4.0)")
    print("each command scans the text about once (the prefix must be unique), so ~20 passes + one copy is the floor")


if __name__ == "__main__":
    main()
