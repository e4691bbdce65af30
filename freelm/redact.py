"""Keep secrets out of everything written: error texts, stored replies, manifests.

Servers and proxies are untrusted: some echo the request's ``Authorization``
header in an error body, and a model may quote it back in a 200 reply. Every
place that stores or prints such text passes it through :func:`redact` (or
:func:`redact_obj` for whole records), which removes

* the exact secret values the caller holds (the API key it sent), and the
  values of environment variables whose names say they hold a secret
  (a ``KEY``, ``TOKEN``, ``SECRET``, ``PASSWORD`` component: ``OPENAI_API_KEY``,
  ``HF_TOKEN``), so a key is caught even where the caller did not pass it;
* whatever follows ``Bearer`` / ``Authorization:`` / ``api-key:`` (any case),
  and ``sk-...``-shaped tokens, for keys this process never knew.

Redact BEFORE truncating: a cut can leave a prefix of the key that no longer
matches the full value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MASK", "environment_secrets", "redact", "redact_obj"]

MASK = "***"

#: Shorter values are too likely to occur by chance (and too weak to be real keys).
_MIN_SECRET_LEN = 8
#: A name component (between underscores) that marks a secret: OPENAI_API_KEY, HF_TOKEN; not TOKENIZERS_PARALLELISM.
_SECRET_NAME = re.compile(r"(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|APIKEY)(?:$|_)", re.IGNORECASE)
_PATTERNS = [
    # "Bearer <token>", "Basic <base64>" (an Authorization header's value, wherever it appears)
    re.compile(r"(?i)(\bbearer\s+)[^\s\"',;}\]]{8,}"),
    re.compile(r"(?i)(\bbasic\s+)[A-Za-z0-9+/]{12,}=*"),
    # "Authorization: <value>", "api-key=<value>", "'x-api-key': '<value>'" (headers or dumped dicts)
    re.compile(
        r"(?i)(\b(?:authorization|proxy-authorization|x-api-key|api[-_]?key)[\"']?\s*[:=]\s*[\"']?)"
        r"(?!\*\*\*|bearer\b|basic\b)[^\s\"',;}\]]+"
    ),
    # OpenAI-style secret keys quoted anywhere
    re.compile(r"()\bsk-[A-Za-z0-9_-]{8,}"),
]


def environment_secrets() -> list[str]:
    """Values of environment variables whose names mark them as secrets (read on every call: tests set them)."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN]


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every known secret and any credential-looking material replaced by :data:`MASK`."""
    if not text:
        return text
    values = {s for s in [*secrets, *environment_secrets()] if s and len(s) >= _MIN_SECRET_LEN}
    if values:
        text = _mask_known(text, values)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return text


def _mask_known(text: str, values: set[str]) -> str:
    """Every run of characters covered by some occurrence of a known value, replaced by one :data:`MASK`.

    The union of all occurrences, not one replacement after another: replacing
    one value first would break an occurrence of another that contains or
    overlaps it and leave that one's other characters in clear.
    """
    covered = bytearray(len(text))
    for value in values:
        at = text.find(value)
        while at >= 0:
            covered[at : at + len(value)] = b"\x01" * len(value)
            at = text.find(value, at + 1)
    pieces, pos = [], 0
    for run in re.finditer(rb"\x01+", covered):
        pieces += [text[pos : run.start()], MASK]
        pos = run.end()
    return "".join(pieces) + text[pos:]


def redact_obj(obj: Any, secrets: Iterable[str | None] = ()) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with :func:`redact` applied to every string."""
    secrets = list(secrets)
    if isinstance(obj, str):
        return redact(obj, secrets)
    if isinstance(obj, dict):
        return {k: redact_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, secrets) for v in obj]
    return obj
