"""A thin tokenizer wrapper: the loop works in token ids and needs the same ids as the server.

Loads any Hugging Face tokenizer directory (``transformers`` is imported lazily
and needs no torch). Kept separate from the backends because the client-side
loop tokenizes even when the model runs on a remote SGLang server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class Tokenizer:
    """Encode/decode without special-token insertion, plus the chat template."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int] | None = None):
        self.hf = hf_tokenizer
        ids = list(eos_token_ids or [])
        if hf_tokenizer.eos_token_id is not None and hf_tokenizer.eos_token_id not in ids:
            ids.append(hf_tokenizer.eos_token_id)
        self.eos_token_ids = ids

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        if (Path(path) / "tokenizer.json").is_file():
            # the fast class directly: AutoTokenizer imports torch, which a remote-only client never needs
            from transformers import PreTrainedTokenizerFast as loader
        else:
            from transformers import AutoTokenizer as loader

        hf = loader.from_pretrained(str(path))
        return cls(hf, eos_token_ids=_generation_eos_ids(Path(path)))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False)) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) if ids else ""

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, str]], *, enable_thinking: bool = True) -> str:
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )

    def common_prefix_tokens(self, ids: list[int], text: str, upto: int) -> int:
        """Largest ``k`` such that ``decode(ids[:k])`` is a prefix of ``text[:upto]``.

        Used after a deletion at character ``upto``: the first ``k`` token ids are
        kept verbatim (so the server's prefix cache still matches them) and only
        the rest is re-tokenized.
        """
        lo, hi = 0, len(ids)
        while lo < hi:  # largest k whose decoded length fits before the edit
            mid = (lo + hi + 1) // 2
            if len(self.decode(ids[:mid])) <= upto:
                lo = mid
            else:
                hi = mid - 1
        k = lo
        while k > 0 and not text.startswith(self.decode(ids[:k])):
            k -= 1  # a multi-byte character split across tokens: back off to a clean boundary
        return k


def _generation_eos_ids(path: Path) -> list[int]:
    """Qwen3 stops on several ids (``<|im_end|>``, ``<|endoftext|>``): read them from generation_config.json."""
    cfg = path / "generation_config.json"
    if not cfg.is_file():
        return []
    eos = json.loads(cfg.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
