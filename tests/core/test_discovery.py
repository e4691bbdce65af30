"""Registries filled by importing a package's modules: a module that cannot import says so at every lookup."""

from __future__ import annotations

import sys

import pytest

from freelm.discovery import import_submodules


def test_a_module_that_fails_to_import_raises_its_error_at_every_lookup(tmp_path, monkeypatch):
    package = tmp_path / "fake_registry_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("FOUND = []\n")
    (package / "good.py").write_text("from fake_registry_pkg import FOUND\nFOUND.append('good')\n")
    (package / "broken.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for _ in range(2):  # the second lookup must not pass silently with half a registry
            with pytest.raises(ModuleNotFoundError, match="a_module_that_does_not_exist"):
                import_submodules("fake_registry_pkg")
        (package / "broken.py").write_text("")  # fixed: the next lookup fills the registry
        sys.modules.pop("fake_registry_pkg.broken", None)
        import_submodules("fake_registry_pkg")
        assert sys.modules["fake_registry_pkg"].FOUND == ["good"]
    finally:
        for name in [m for m in sys.modules if m.startswith("fake_registry_pkg")]:
            del sys.modules[name]
