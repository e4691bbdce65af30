"""The paper's ICL baseline (``--cleaner icl``): the base model, given the cleaning prompt, with no adapter.

It isolates what training buys: the same prompt, the same executor and the
same budgets as the Free-Module (the shared
:class:`~freelm.cleaners.prompted.PromptedCleaner`), but the instructions alone
must make the base model write the deletion JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

from freelm.cleaners.prompted import PromptedCleaner
from freelm.cleaners.registry import register


@register
@dataclass
class ICLCleaner(PromptedCleaner):
    """The cleaning prompt on the base model (``adapter`` stays ``None``: no adapter is a setting of it)."""

    name: str = "icl"
