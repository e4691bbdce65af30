"""Where the files tests read live, named once.

Not a test module: ``tests/`` is on ``sys.path`` (pytest puts the root conftest's folder there), so a test
in any subfolder imports it by name. Test files sit one folder below ``tests/``; none counts parents itself.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
EMBEDDED = REPO / "freelm" / "assets" / "embedded"
CLEAN_TEMPLATE = REPO / "freelm" / "demo" / "clean_template.txt"
#: the shared benchmark files beside the checkout (outside the repo: tests that read them skip without them)
SHARED_BENCHMARKS = REPO.parent / "shared" / "data" / "benchmarks"
#: small runner outputs and problems the evaluation tests read (their provenance: fixtures/eval/README.md)
EVAL_FIXTURES = FIXTURES / "eval"
