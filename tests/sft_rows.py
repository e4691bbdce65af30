"""SFT rows ``{"prompt", "completion"}`` rendered from a cleaning template, as a released Free-Module's data holds them.

Not a test module: pytest puts ``tests/`` on ``sys.path`` (no ``__init__.py``), so
tests import it by name (``freelm template infer`` and the released-adapter flow of
the reproduction scripts).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from freelm.prompts import render_cleaning_prompt

WORDS = "alpha beta gamma delta seven apples circle prime sum integer triangle area ratio even odd".split()


def make_rows(template: str, n: int = 12, seed: int = 0, fmt: str = "bare") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        # slot texts that share no start or end across rows: what they share is template text (the method's limit)
        problem = f"{rng.choice(WORDS).capitalize()} {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(4, 9)))
        problem += rng.choice("?.!") + str(i)
        steps = [f"{rng.choice(WORDS)} step {j} " + " ".join(rng.choices(WORDS, k=6)) for j in range(rng.randint(3, 6))]
        thinking = f"{i} " + "\n".join(steps) + f" {rng.random():.6f}"
        deletion = [{"prefix": steps[1][:14], "suffix": steps[1][-8:]}] if i % 3 else []
        body = json.dumps(deletion)
        completion = {"bare": body, "fenced": f"```json\n{body}\n```", "think": f"<think>\n\n</think>\n\n{body}"}[fmt]
        rows.append(
            {"prompt": render_cleaning_prompt(problem, thinking, template_file(template)), "completion": completion}
        )
    return rows


def template_file(template: str) -> Path:
    path = Path(tempfile.mkdtemp()) / "t.txt"
    path.write_text(template)
    return path


def disjoint_rows(template: str, n: int = 8) -> list[dict]:
    """Rows whose slot texts share no character across rows (each row writes in its own 64 CJK characters).

    Then only the template is common to every row, even where it joins the two slots
    with a single newline (the embedded default's template): text that every row's
    problem or thinking happens to share is indistinguishable from template text,
    the limit ``freelm template infer`` documents. The completion deletes a span of
    the thinking, so the slot order is read off the anchors.
    """
    rows = []
    for i in range(n):
        rng = random.Random(i)
        letters = [chr(0x4E00 + 64 * i + k) for k in range(64)]
        problem = "".join(rng.choices(letters[:32], k=12))
        thinking = "".join(rng.choices(letters[32:], k=30))
        completion = json.dumps([{"prefix": thinking[:5], "suffix": thinking[12:16]}], ensure_ascii=False)
        rows.append(
            {"prompt": render_cleaning_prompt(problem, thinking, template_file(template)), "completion": completion}
        )
    return rows
