"""The tests' own layout: one folder per subject, as docs/testing.md lists them, and no basename twice.

A test file at the top of ``tests/`` or in a folder the table does not name has no subject a reader can find;
two files with one basename would collide (pytest imports test files by basename: no ``__init__.py``).
"""

from __future__ import annotations

import re
from collections import Counter

from repo_paths import REPO

TESTS = REPO / "tests"


def documented_folders() -> set[str]:
    text = (REPO / "docs" / "testing.md").read_text()
    section = text.split("## Where tests live", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)/` \|", section, re.M))


def test_every_test_file_is_in_a_documented_folder_and_every_folder_holds_tests():
    folders = documented_folders()
    assert "core" in folders and "realserver" in folders  # the table was found
    assert sorted(p.name for p in TESTS.glob("test_*.py")) == []
    used = {p.parent.name for p in TESTS.glob("*/test_*.py")}
    assert used == folders, f"undocumented: {sorted(used - folders)}; empty: {sorted(folders - used)}"


def test_no_two_test_files_or_helpers_share_a_basename():
    names = Counter(p.name for p in TESTS.rglob("*.py") if "fixtures" not in p.parts and p.name != "__init__.py")
    names.pop("conftest.py", None)  # pytest loads each folder's conftest by path
    assert [name for name, n in names.items() if n > 1] == []
