"""Cleaning policies, one module each, selected by name through :mod:`freelm.cleaners.registry`.

``free`` is the Free-Module (:class:`~freelm.cleaners.free_module.FreeModuleCleaner`);
the others are baselines and bounds (docs/runner.md lists them). Vanilla is no
cleaner at all (``cleaner=None`` in the loop, ``--mode vanilla`` in the runner),
so it has no class here.
"""

from __future__ import annotations

from freelm.cleaners.base import Cleaner, CleanOutcome
from freelm.cleaners.free_module import FreeModuleCleaner
from freelm.cleaners.headtail import HeadTailCleaner
from freelm.cleaners.registry import cleaner_names, get_cleaner, register
from freelm.setting import setting

__all__ = [
    "CleanOutcome",
    "Cleaner",
    "FreeModuleCleaner",
    "HeadTailCleaner",
    "cleaner_names",
    "get_cleaner",
    "register",
    "setting",
]
