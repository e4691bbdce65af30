"""What the backend test files share: one call on a fresh backend, and a scripted SGLang-protocol server.

Not a test module: pytest puts ``tests/`` on ``sys.path`` (no ``__init__.py``), so
``test_backend_*.py`` import it by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from freelm.testing.engines import Script, ScriptedEngine
from freelm.testing.sglang_server import SGLangTestServer


def call(backend_class: type, coro_fn: Callable[[Any], Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    """``coro_fn(backend)`` on a fresh ``backend_class(*args, **kwargs)``, closed after (one event loop per call)."""

    async def main() -> Any:
        backend = backend_class(*args, **kwargs)
        try:
            return await coro_fn(backend)
        finally:
            await backend.aclose()

    return asyncio.run(main())


def scripted_server_fixture(outputs: dict[str | None, Script], **options: Any):
    """A module-scoped fixture: an :class:`SGLangTestServer` (``options``) over ``ScriptedEngine(outputs)``."""

    @pytest.fixture(scope="module")
    def scripted_server():
        with SGLangTestServer(ScriptedEngine(outputs), **options) as server:
            yield server

    return scripted_server
