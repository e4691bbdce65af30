"""Cleaning policies, one module each, selected by name through :mod:`freelm.cleaners.registry`.

``free`` is the Free-Module LoRA (``LoRACleaner``); the others are baselines and
bounds (docs/runner.md lists them). Vanilla is no cleaner at all (``cleaner=None``
in the loop, ``--mode vanilla`` in the runner), so it has no class here.
"""

from __future__ import annotations

from freelm.cleaners.base import Cleaner, CleanOutcome
from freelm.cleaners.headtail import HeadTailCleaner
from freelm.cleaners.lora import LoRACleaner
from freelm.cleaners.registry import cleaner_names, get_cleaner, register, setting

__all__ = [
    "CleanOutcome",
    "Cleaner",
    "HeadTailCleaner",
    "LoRACleaner",
    "cleaner_names",
    "get_cleaner",
    "register",
    "setting",
]
