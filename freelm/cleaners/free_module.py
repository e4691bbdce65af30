"""The Free-Module (``--cleaner free``, records labelled ``freelm``): the base model with its LoRA adapter on.

The paper's cleaner: the same base model as the reasoner, with the Free-Module
adapter switched on per request, reads the cleaning prompt and writes the
deletions that the executor (:mod:`freelm.free`) applies. Everything but the
adapter is the prompted call it shares with the ICL baseline
(:class:`~freelm.cleaners.prompted.PromptedCleaner`).
"""

from __future__ import annotations

from dataclasses import dataclass

from freelm.cleaners.prompted import PromptedCleaner
from freelm.cleaners.registry import register
from freelm.setting import setting


@register(label="freelm")
@dataclass
class FreeModuleCleaner(PromptedCleaner):
    """The cleaning prompt, sent with the Free-Module's adapter (by its served name, ``--adapter-name``)."""

    adapter: str | None = setting(
        "free", flag="--adapter-name", metavar="NAME",
        help="LoRA adapter name as registered with the server (SGLang --lora-paths NAME=PATH, vLLM --lora-modules NAME=PATH)",
    )  # fmt: skip
    name: str = "free"
