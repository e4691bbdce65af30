"""A Backend over several endpoints: least-loaded healthy routing with failover.

Why a pool is itself a :class:`~freelm.backends.base.Backend`: the loop keeps a
rollout's whole state (token ids, text, telemetry) between calls, so retrying
ONE failed request on another server resumes the rollout exactly where it was.
A dead server therefore costs time, never results.

Routing: each request goes to the healthy endpoint with the fewest requests in
flight (ties rotate, so equal servers share the load from the first request),
except that a rollout's requests (cleaning calls included) stay on the endpoint
that served its last one, the one holding its prefix in its radix cache, while
that endpoint is up and not loaded clearly above the least-loaded one (more
than ``affinity_slack`` requests AND ``affinity_ratio`` times its in-flight
count): least-loaded alone keeps a rollout in place at steady state, but in an
under-subscribed pool (a small run, every run's tail) ties rotate and a
rollout's calls scatter over servers that have none of its prefix
(``bench/cache_affinity_bench.py``). A rollout is the scope of
:func:`rollout_affinity` (the loop opens one per rollout); when the home
endpoint fails or goes down, the request goes elsewhere and the rollout's
affinity moves with it.

Failover: a :class:`~freelm.backends.base.TransientBackendError` (connection error, timeout, 5xx)
is retried at once on the least-loaded healthy endpoint (possibly the same
one). Each endpoint has a circuit breaker: only ``failure_threshold``
CONSECUTIVE failures, plus one per request still in flight on it (errors come
back at once while answers take seconds, so a busy server's errors arrive in
bursts), open it (out of rotation), because a single 5xx from a busy but
working server is noise, and taking it out for a second each time made a run
at a 20% error rate 10x slower. An open endpoint is re-probed in the
background (a remote one by its ``health()``, an in-process engine simply after the cool-down)
with exponential backoff and jitter; when it answers (and passes :attr:`EndpointPool.vet`, the runner's
start-up checks: a server that restarted with a smaller window or without the adapter stays out) it is HALF-OPEN: back in
rotation with at most one request in flight while a closed endpoint exists, a
success closes it, a failure opens it again at once with a doubled cool-down.
When no endpoint is up, requests wait (up to ``down_wait`` seconds) for one to
come back. A plain :class:`~freelm.backends.base.BackendError` (4xx: bad request, unknown adapter)
would fail the same way everywhere, so it is raised at once.

Hangs: a server that accepts a request and never answers would hold a rollout
for the client's whole timeout (600 s by default). In a pool of remote
endpoints (``remote=True``, the registry's flag of their kind), once ``hang_samples``
requests of a similar budget (at least half this one's ``max_new_tokens``)
have succeeded, a request running ``hang_factor`` (3) times longer than the
slowest of the recent ones (and at least ``min_hang_s``) is abandoned as a
transient failure and retried; each retry of the same request doubles that
deadline, so a server that merely became slower is soon waited for.

Endpoints are expected to fail fast (``max_retries=0`` on the per-endpoint
client): retrying is the pool's job, and retrying on the same dead server
before failing over only wastes time.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import random
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from freelm.backends.base import (
    Backend,
    GenerateRequest,
    GenerateResult,
    RemoteBackend,
    TransientBackendError,
    missing_members,
)

#: What the pool asks of a remote endpoint (:class:`~freelm.backends.base.RemoteBackend`), checked when it is built.
_PROBED = ("health()", "health_error")


@dataclass
class EndpointState:
    """Routing state and counters of one endpoint (counters feed the progress bar and the manifest)."""

    backend: Backend
    up: bool = True
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    consecutive_failures: int = 0
    half_open: bool = False  # re-admitted after a probe; the next result closes or reopens the breaker
    cooldown: float = 0.0  # seconds before the next probe once open (doubles after a failed trial)
    probe: asyncio.Task | None = field(default=None, repr=False)

    def stats(self) -> dict:
        return {
            "name": self.backend.name,
            "up": self.up,
            "requests": self.requests,
            "failures": self.failures,
            "last_error": self.last_error,
        }


class Affinity:
    """One rollout's home endpoint in each pool it uses (dropped with the rollout: nothing to clean up)."""

    __slots__ = ("homes",)

    def __init__(self) -> None:
        self.homes: dict[EndpointPool, EndpointState] = {}


_affinity: contextvars.ContextVar[Affinity | None] = contextvars.ContextVar("freelm_rollout_affinity", default=None)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def rollout_affinity(func: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
    """Decorate a coroutine function: each call is one rollout, whose requests share an :class:`Affinity`.

    A context variable, not a request field, so that cleaners (which only see
    the problem and the thinking) route their calls with the rollout too.
    """

    @functools.wraps(func)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        token = _affinity.set(Affinity())
        try:
            return await func(*args, **kwargs)
        finally:
            _affinity.reset(token)

    return wrapper


class EndpointPool:
    """Route requests over ``backends``; see the module docstring for the policy.

    ``remote`` says what the endpoints are (the registry's ``BackendKind.remote``
    of their kind): servers, whose ``health()`` is probed and whose requests may
    be presumed hung (each must implement
    :class:`~freelm.backends.base.RemoteBackend`'s ``health``), or in-process
    engines, never probed nor presumed hung. It has no default: a pool that
    guessed would silently lose hang detection, or cancel an engine's batch.
    ``max_retries`` bounds the failed attempts of ONE request before it fails
    for good with a TransientBackendError. The default (8) completes a run at
    20% 5xx, 5% dropped connections and 1% hangs per attempt (a request then
    fails for good with probability 0.26^9, about 5e-6): ``bench/fault_bench.py``.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        remote: bool,
        max_retries: int = 8,
        failure_threshold: int = 3,
        probe_interval: float = 1.0,
        max_probe_interval: float = 30.0,
        down_wait: float = 600.0,
        hang_factor: float = 3.0,
        hang_samples: int = 8,
        min_hang_s: float = 2.0,
        affinity: bool = True,
        affinity_slack: int = 2,
        affinity_ratio: float = 1.25,
        name: str | None = None,
    ):
        if not backends:
            raise ValueError("EndpointPool needs at least one backend")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if min_hang_s <= 0:
            raise ValueError(f"min_hang_s must be > 0, got {min_hang_s}")
        for backend in backends if remote else ():
            lacking = [m for m in missing_members(backend, RemoteBackend) if m in _PROBED]
            if lacking:
                raise TypeError(f"{backend.name}: a remote endpoint is probed, and lacks {', '.join(lacking)}")
        self.remote = remote
        self.endpoints = [EndpointState(b, cooldown=probe_interval) for b in backends]
        self.max_retries = max_retries
        self.failure_threshold = failure_threshold
        self.probe_interval = probe_interval
        self.max_probe_interval = max_probe_interval
        self.down_wait = down_wait
        self.hang_factor = hang_factor
        self.hang_samples = hang_samples
        self.min_hang_s = min_hang_s
        self.affinity = affinity
        self.affinity_slack = affinity_slack
        self.affinity_ratio = affinity_ratio
        self.name = name or f"pool[{', '.join(b.name for b in backends)}]"
        self.retries = 0
        self.hangs = 0
        self._recent: deque[tuple[int, float]] = deque(maxlen=256)  # (max_new_tokens, seconds) of successes
        self._turn = 0
        self._some_up: asyncio.Event | None = None  # created inside the running loop
        #: Run on an endpoint that answers its health probe again, before it is re-admitted: None when it may
        #: serve, else why not (e.g. it restarted with a smaller window). Set by the runner after its start-up
        #: checks, so an endpoint skipped at start, or restarted mid-run, serves only what they allowed.
        self.vet: Callable[[Backend], Awaitable[str | None]] | None = None

    # ----- state ----------------------------------------------------------

    @property
    def endpoints_up(self) -> int:
        return sum(e.up for e in self.endpoints)

    def stats(self) -> dict:
        return {"retries": self.retries, "hangs": self.hangs, "endpoints": [e.stats() for e in self.endpoints]}

    def _event(self) -> asyncio.Event:
        if self._some_up is None:
            self._some_up = asyncio.Event()
            if self.endpoints_up:
                self._some_up.set()
        return self._some_up

    async def check_health(self) -> int:
        """Probe every endpoint once (e.g. before a run); unhealthy ones are taken out. Returns the number up."""
        results = await asyncio.gather(*(self._healthy(e.backend) for e in self.endpoints))
        for endpoint, ok in zip(self.endpoints, results):
            if not ok:
                self._mark_down(endpoint, endpoint.backend.health_error or "health check failed")
        return self.endpoints_up

    def take_out(self, endpoint: EndpointState, reason: str) -> None:
        """Out of rotation until it answers a health probe again (and passes :attr:`vet`, when set)."""
        self._mark_down(endpoint, reason)

    async def wait_until_up(self) -> bool:
        """Wait up to ``down_wait`` seconds for an endpoint to answer (a server still loading its model: 503)."""
        try:
            await asyncio.wait_for(self._event().wait(), timeout=self.down_wait)
        except asyncio.TimeoutError:
            return False
        return True

    # ----- routing --------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        failures = hangs = 0
        failed_on: set[int] = set()  # a retry prefers endpoints this request has not failed on (a dead one stays
        loop = asyncio.get_running_loop()  # in rotation until its breaker opens, with the fewest requests in flight)
        while True:
            endpoint = await self._acquire(failed_on)
            endpoint.in_flight += 1
            endpoint.requests += 1
            started = loop.time()
            try:
                result = await self._call(endpoint, request, hangs)
            except TransientBackendError as exc:
                if isinstance(exc, _Hung):
                    hangs += 1
                    self.hangs += 1
                self._record_failure(endpoint, str(exc))
                failed_on.add(id(endpoint))
                failures += 1
                if failures > self.max_retries:
                    raise TransientBackendError(
                        f"{self.name}: gave up after {failures} failed attempts; last: {exc}"
                    ) from exc
                self.retries += 1
                continue
            finally:
                endpoint.in_flight -= 1
            self._record_success(endpoint, request, loop.time() - started)
            if result.endpoint is None:
                result.endpoint = endpoint.backend.name
            return result

    async def _call(self, endpoint: EndpointState, request: GenerateRequest, hangs: int) -> GenerateResult:
        """One attempt, abandoned (:class:`_Hung`) once it outlives its hang deadline.

        A timer watches the attempt, so a request that is answered costs one
        timer and one task, not a wait loop. No deadline is shorter than
        ``min_hang_s``, so the history is first scanned that long after the
        send (most answers come sooner and never pay for the scan), and then
        again at each deadline it finds: requests sent before any history
        existed (a run's first wave) are still caught once it exists.
        """
        if not self.remote:  # in-process engine: never presumed hung
            return await endpoint.backend.generate(request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = loop.create_task(endpoint.backend.generate(request))
        hung: list[_Hung] = []

        def check() -> None:
            nonlocal timer
            deadline = self._hang_deadline(endpoint, request, hangs)
            wait = self.min_hang_s if deadline is None else deadline - (loop.time() - started)
            if wait > 0:
                timer = loop.call_later(wait, check)
                return
            hung.append(
                _Hung(
                    f"{endpoint.backend.name}: no answer within {deadline:.1f}s "
                    f"({self.hang_factor:g}x the slowest recent request of this size): presumed hung"
                )
            )
            attempt.cancel()

        timer = loop.call_later(self.min_hang_s, check)
        try:
            return await attempt
        except asyncio.CancelledError:
            if hung and not _cancelling():  # our timer cancelled the attempt, nobody cancelled this request
                raise hung[0] from None
            raise
        finally:
            timer.cancel()
            if not attempt.done():
                attempt.cancel()

    def _hang_deadline(self, endpoint: EndpointState, request: GenerateRequest, hangs: int) -> float | None:
        """Seconds after which this attempt is presumed hung, or None: not enough history, or an in-process
        engine (it cannot hang like a server, and its batch should not see cancellations)."""
        if not self.remote:
            return None
        similar = [s for n, s in self._recent if n >= request.max_new_tokens / 2]
        if len(similar) < self.hang_samples:
            return None
        return max(self.min_hang_s, self.hang_factor * max(similar)) * 2**hangs

    def _record_success(self, endpoint: EndpointState, request: GenerateRequest, seconds: float) -> None:
        self._recent.append((request.max_new_tokens, seconds))
        endpoint.consecutive_failures = 0
        if endpoint.half_open:  # the trial succeeded: close the breaker
            endpoint.half_open = False
            endpoint.cooldown = self.probe_interval

    def _record_failure(self, endpoint: EndpointState, error: str) -> None:
        endpoint.failures += 1
        endpoint.consecutive_failures += 1
        endpoint.last_error = error
        if endpoint.half_open:  # the trial failed: open again, and wait longer before the next probe
            endpoint.half_open = False
            endpoint.cooldown = min(self.max_probe_interval, endpoint.cooldown * 2)
            self._mark_down(endpoint, error)
        elif endpoint.consecutive_failures >= self.failure_threshold + endpoint.in_flight - 1:  # - the failed one
            # requests still running there may yet succeed: a fast burst of errors (they come back at once,
            # answers take seconds) from a busy server is not yet evidence that it is down
            self._mark_down(endpoint, error)

    async def _acquire(self, avoid: set[int] = frozenset()) -> EndpointState:
        """The least-loaded healthy endpoint, waiting up to ``down_wait`` seconds for one to come back."""
        if not self._event().is_set():
            await self._wait_for_endpoint()
        up = [e for e in self.endpoints if e.up]
        if len(up) > 1:  # (with one endpoint up, the filters below could only fall back to it)
            up = [e for e in up if not (e.half_open and e.in_flight)] or up  # one trial at a time while others serve
            up = [e for e in up if id(e) not in avoid] or up
        self._turn += 1
        n = len(up)
        least = up[0] if n == 1 else min((up[(self._turn + i) % n] for i in range(n)), key=lambda e: e.in_flight)
        affinity = _affinity.get() if self.affinity else None
        if affinity is None:
            return least
        home = affinity.homes.get(self)
        if home is not None and any(e is home for e in up) and not self._overloaded(home, least):
            return home
        affinity.homes[self] = least  # first request, or failover: the rollout moves, its affinity with it
        return least

    async def _wait_for_endpoint(self) -> None:
        """Wait up to ``down_wait`` seconds for an endpoint to come back (a loop: it may go down again at once)."""
        event = self._event()
        deadline = asyncio.get_running_loop().time() + self.down_wait
        while not event.is_set():
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(event.wait(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                errors = "; ".join(f"{e.backend.name}: {e.last_error}" for e in self.endpoints)
                raise TransientBackendError(
                    f"{self.name}: no healthy endpoint for {self.down_wait:g}s ({errors})"
                ) from None

    def _overloaded(self, home: EndpointState, least: EndpointState) -> bool:
        """Clearly above the least-loaded endpoint: worth a cold prefix elsewhere."""
        excess = home.in_flight - least.in_flight
        return excess > self.affinity_slack and home.in_flight > self.affinity_ratio * least.in_flight

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
        delay = endpoint.cooldown
        while True:
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            if await self._healthy(endpoint.backend):
                refusal = await self._vetted(endpoint.backend)
                if refusal is None:
                    break
                endpoint.last_error = refusal
            delay = min(self.max_probe_interval, delay * 2)
        endpoint.up = True
        endpoint.half_open = True
        endpoint.consecutive_failures = 0
        endpoint.probe = None
        self._event().set()

    async def _healthy(self, backend: Backend) -> bool:
        """A remote endpoint's ``health()``; an in-process engine is presumed healthy: re-admitting it is the probe."""
        if not self.remote:
            return True
        try:
            return bool(await backend.health())
        except Exception:  # a probe that crashes is a failed probe, never a crashed run
            return False

    async def _vetted(self, backend: Backend) -> str | None:
        """:attr:`vet`'s answer; a check that crashes keeps the endpoint out, with the crash as the reason."""
        if self.vet is None:
            return None
        try:
            return await self.vet(backend)
        except Exception as exc:
            return f"re-admission check failed: {type(exc).__name__}: {exc}"

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


class _Hung(TransientBackendError):
    """An attempt abandoned at its hang deadline (retried like any transient failure)."""


def _cancelling() -> bool:
    """Whether the running task was asked to cancel (Python 3.11+; on 3.10 a cancellation racing a hang reads as the hang)."""
    task = asyncio.current_task()
    return bool(getattr(task, "cancelling", lambda: 0)())
