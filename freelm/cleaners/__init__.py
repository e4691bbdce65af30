"""Cleaning policies: the Free-Module LoRA (``LoRACleaner``) and the head-and-tail truncation baseline.

Vanilla is no cleaner at all (``cleaner=None`` in the loop, ``--mode vanilla``
in the runner), so it has no class here.
"""

from __future__ import annotations

from freelm.cleaners.base import Cleaner, CleanOutcome
from freelm.cleaners.headtail import HeadTailCleaner
from freelm.cleaners.lora import LoRACleaner

__all__ = ["CleanOutcome", "Cleaner", "HeadTailCleaner", "LoRACleaner"]
