"""A Backend over several endpoints: least-loaded healthy routing with failover.

Why a pool is itself a :class:`~freelm.backends.base.Backend`: the loop keeps a
rollout's whole state (token ids, text, telemetry) between calls, so retrying
ONE failed request on another server resumes the rollout exactly where it was.
A dead server therefore costs time, never results.

Routing: each request goes to the healthy endpoint with the fewest requests in
flight (ties rotate, so equal servers share the load from the first request).

Failover: a :class:`TransientBackendError` (connection error, timeout, 5xx)
takes the endpoint out of rotation and the same request is retried on another
one at once; the endpoint is re-probed in the background (its ``health()`` when
it has one, else simply re-admitted) with exponential backoff and jitter until
it answers. When no endpoint is up, requests wait (up to ``down_wait`` seconds)
for one to come back. A plain :class:`BackendError` (4xx: bad request, unknown
adapter) would fail the same way everywhere, so it is raised at once.

Endpoints are expected to fail fast (``max_retries=0`` on the per-endpoint
client): retrying is the pool's job, and retrying on the same dead server
before failing over only wastes time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from freelm.backends.base import Backend, GenerateRequest, GenerateResult, TransientBackendError


@dataclass
class EndpointState:
    """Routing state and counters of one endpoint (counters feed the progress bar and the manifest)."""

    backend: Backend
    up: bool = True
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    probe: asyncio.Task | None = field(default=None, repr=False)

    def stats(self) -> dict:
        return {
            "name": self.backend.name,
            "up": self.up,
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class EndpointPool:
    """Route requests over ``backends``; see the module docstring for the policy.

    ``max_retries`` bounds the failed attempts of ONE request (each on a fresh
    healthy endpoint) before it fails for good with a TransientBackendError.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        max_retries: int = 3,
        probe_interval: float = 1.0,
        max_probe_interval: float = 30.0,
        down_wait: float = 600.0,
        name: str | None = None,
    ):
        if not backends:
            raise ValueError("EndpointPool needs at least one backend")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.endpoints = [EndpointState(b) for b in backends]
        self.max_retries = max_retries
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self.down_wait = down_wait
        self.name = name or f"pool[{', '.join(b.name for b in backends)}]"
        self.retries = 0
        self._turn = 0
        self._some_up: asyncio.Event | None = None  # created inside the running loop

    # ----- state ----------------------------------------------------------

    @property
    def endpoints_up(self) -> int:
        return sum(e.up for e in self.endpoints)

    def stats(self) -> dict:
        return {"retries": self.retries, "endpoints": [e.stats() for e in self.endpoints]}

    def _event(self) -> asyncio.Event:
        if self._some_up is None:
            self._some_up = asyncio.Event()
            if self.endpoints_up:
                self._some_up.set()
        return self._some_up

    async def check_health(self) -> int:
        """Probe every endpoint once (e.g. before a run); unhealthy ones are taken out. Returns the number up."""
        results = await asyncio.gather(*(_healthy(e.backend) for e in self.endpoints))
        for endpoint, ok in zip(self.endpoints, results):
            if not ok:
                self._mark_down(endpoint, "health check failed")
        return self.endpoints_up

    # ----- routing --------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        failures = 0
        while True:
            endpoint = await self._acquire()
            endpoint.in_flight += 1
            endpoint.requests += 1
            try:
                result = await endpoint.backend.generate(request)
            except TransientBackendError as exc:
                endpoint.failures += 1
                self._mark_down(endpoint, str(exc))
                failures += 1
                if failures > self.max_retries:
                    raise TransientBackendError(
                        f"{self.name}: gave up after {failures} failed attempts; last: {exc}"
                    ) from exc
                self.retries += 1
                continue
            finally:
                endpoint.in_flight -= 1
            if result.endpoint is None:
                result.endpoint = endpoint.backend.name
            return result

    async def _acquire(self) -> EndpointState:
        """The least-loaded healthy endpoint, waiting up to ``down_wait`` seconds for one to come back."""
        event = self._event()
        deadline = asyncio.get_running_loop().time() + self.down_wait
        while not event.is_set():  # a loop: an endpoint may go down again before this request runs
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(event.wait(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                errors = "; ".join(f"{e.backend.name}: {e.last_error}" for e in self.endpoints)
                raise TransientBackendError(
                    f"{self.name}: no healthy endpoint for {self.down_wait:g}s ({errors})"
                ) from None
        up = [e for e in self.endpoints if e.up]
        self._turn += 1
        n = len(up)
        return min((up[(self._turn + i) % n] for i in range(n)), key=lambda e: e.in_flight)

    # ----- health ---------------------------------------------------------

    def _mark_down(self, endpoint: EndpointState, error: str) -> None:
        endpoint.last_error = error
        if not endpoint.up:
            return
        endpoint.up = False
        if not self.endpoints_up:
            self._event().clear()
        endpoint.probe = asyncio.create_task(self._probe_until_up(endpoint), name=f"probe {endpoint.backend.name}")

    async def _probe_until_up(self, endpoint: EndpointState) -> None:
        delay = self.probe_interval
        while True:
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            if await _healthy(endpoint.backend):
                break
            delay = min(self.max_probe_interval, delay * 2)
        endpoint.up = True
        endpoint.probe = None
        self._event().set()

    async def aclose(self) -> None:
        probes = [e.probe for e in self.endpoints if e.probe is not None]
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        closed: set[int] = set()
        for endpoint in self.endpoints:
            if id(endpoint.backend) not in closed:
                closed.add(id(endpoint.backend))
                await endpoint.backend.aclose()


async def _healthy(backend: Backend) -> bool:
    """A backend without ``health()`` (in-process engines) is presumed healthy: re-admitting it is the probe."""
    health = getattr(backend, "health", None)
    if health is None:
        return True
    try:
        return bool(await health())
    except Exception:  # a probe that crashes is a failed probe, never a crashed run
        return False
