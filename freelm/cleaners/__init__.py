"""Cleaning policies, selectable by name: ``free`` (the Free-Module LoRA), ``none`` (vanilla), ``headtail``."""

from __future__ import annotations

from freelm.cleaners.base import Cleaner, CleanOutcome
from freelm.cleaners.headtail import HeadTailCleaner
from freelm.cleaners.lora import LoRACleaner

CLEANERS = ("free", "none", "headtail")

__all__ = ["CLEANERS", "CleanOutcome", "Cleaner", "HeadTailCleaner", "LoRACleaner"]
