"""The paper's ICL baseline (``--cleaner icl``): the base model, given the cleaning prompt, with no adapter.

It isolates what training buys: the same prompt, the same executor and the
same budgets as the Free-Module, but the instructions alone must make the base
model write the deletion JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from freelm.cleaners.lora import LoRACleaner
from freelm.cleaners.registry import register


@register
@dataclass
class ICLCleaner(LoRACleaner):
    """:class:`LoRACleaner` with the adapter off; its settings are the prompt's, not an adapter's."""

    adapter: str | None = None
    name: str = "icl"
