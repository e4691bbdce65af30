"""Filling a registry from a package: import each of its modules once, and each registers what it defines.

Shared by the cleaner registry (:mod:`freelm.cleaners.registry`) and the
backend registry (:mod:`freelm.backends`), so that adding a cleaner or a
backend is adding one file, with no list of modules to keep in step.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Collection

_imported: set[str] = set()  # packages already walked


def import_submodules(package: str, skip: Collection[str] = ()) -> None:
    """Import every module of ``package`` except those named in ``skip``; once per package (later calls are free)."""
    if package in _imported:
        return
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if module.name not in skip:
            importlib.import_module(f"{package}.{module.name}")
    # Marked only once every module imported: a module that fails to import raises its own error
    # at every lookup, instead of the lookup reporting its kind as unknown.
    _imported.add(package)
