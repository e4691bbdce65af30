"""EndpointPool: least-loaded routing, failover of the same request, health re-probing (no network, no torch)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import pytest

from freelm.backends.base import BackendError, GenerateRequest, GenerateResult, TransientBackendError
from freelm.backends.pool import EndpointPool, rollout_affinity


@dataclass
class FakeEndpoint:
    """Answers its own name after ``delay``; ``healthy=False`` makes both requests and probes fail."""

    name: str
    delay: float = 0.01
    healthy: bool = True
    fail: deque = field(default_factory=deque)
    calls: int = 0
    probes: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    closed: bool = False
    health_error: str | None = None

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.fail:
            raise self.fail.popleft()
        if not self.healthy:
            raise TransientBackendError(f"{self.name}: connection refused")
        return GenerateResult(
            text=self.name,
            output_ids=list(request.input_ids),
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
        )

    async def health(self) -> bool:
        self.probes += 1
        return self.healthy

    async def aclose(self) -> None:
        self.closed = True


def request(i: int = 0) -> GenerateRequest:
    return GenerateRequest(input_ids=[i], max_new_tokens=4)


def gather(pool: EndpointPool, n: int) -> list[GenerateResult]:
    async def go():
        try:
            return await asyncio.gather(*(pool.generate(request(i)) for i in range(n)))
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_least_loaded_routing_spreads_concurrent_requests():
    a, b, c = FakeEndpoint("a"), FakeEndpoint("b"), FakeEndpoint("c")
    results = gather(EndpointPool([a, b, c], remote=True), 30)
    assert [r.output_ids for r in results] == [[i] for i in range(30)]
    assert (a.calls, b.calls, c.calls) == (10, 10, 10)
    assert a.closed and b.closed and c.closed


def test_least_loaded_prefers_the_idle_endpoint():
    a, b = FakeEndpoint("a", delay=0.5), FakeEndpoint("b", delay=0.5)
    pool = EndpointPool([a, b], remote=True)

    async def go():
        first = asyncio.create_task(pool.generate(request()))  # occupies one endpoint for 0.5 s
        await asyncio.sleep(0.01)
        a.delay = b.delay = 0.001
        sequential = [await pool.generate(request(i)) for i in range(5)]
        await first
        await pool.aclose()
        return sequential

    # whichever endpoint took the first request, the next ones go to the other, idle one
    names = {r.text for r in asyncio.run(go())}
    assert len(names) == 1


def test_transient_failure_retries_the_same_request_elsewhere_and_reprobes():
    dead, alive = FakeEndpoint("dead", healthy=False), FakeEndpoint("alive")
    pool = EndpointPool([dead, alive], probe_interval=0.05, remote=True)

    async def go():
        results = await asyncio.gather(*(pool.generate(request(i)) for i in range(8)))
        assert not pool.endpoints[0].up and pool.endpoints_up == 1
        dead.healthy = True
        for _ in range(100):
            if pool.endpoints[0].up:
                break
            await asyncio.sleep(0.02)
        after = await asyncio.gather(*(pool.generate(request(i)) for i in range(8)))
        await pool.aclose()
        return results, after

    results, after = asyncio.run(go())
    assert [r.output_ids for r in results] == [[i] for i in range(8)]  # each request kept its own payload
    assert all(r.text == "alive" for r in results)
    assert pool.retries >= 1 and dead.probes >= 1
    assert pool.endpoints[0].up and {r.text for r in after} == {"dead", "alive"}


def test_backend_error_is_not_retried():
    a, b = FakeEndpoint("a"), FakeEndpoint("b")
    a.fail.append(BackendError("HTTP 400: unknown adapter"))
    b.fail.append(BackendError("HTTP 400: unknown adapter"))
    pool = EndpointPool([a, b], remote=True)

    async def go():
        with pytest.raises(BackendError, match="unknown adapter") as info:
            await pool.generate(request())
        await pool.aclose()
        return info.value

    exc = asyncio.run(go())
    assert not isinstance(exc, TransientBackendError)
    assert a.calls + b.calls == 1 and pool.retries == 0 and pool.endpoints_up == 2


def test_gives_up_after_max_retries():
    flaky = FakeEndpoint("flaky")
    flaky.fail.extend(TransientBackendError(f"HTTP 503 #{i}") for i in range(10))
    pool = EndpointPool([flaky], max_retries=2, probe_interval=0.01, remote=True)

    async def go():
        with pytest.raises(TransientBackendError, match="gave up after 3 failed attempts; last: HTTP 503 #2"):
            await pool.generate(request())
        await pool.aclose()

    asyncio.run(go())
    assert flaky.calls == 3 and pool.retries == 2


def test_all_down_waits_for_a_probe_then_succeeds():
    only = FakeEndpoint("only", healthy=False)
    pool = EndpointPool([only], max_retries=5, probe_interval=0.05, remote=True)

    async def go():
        task = asyncio.create_task(pool.generate(request(7)))
        await asyncio.sleep(0.1)
        assert pool.endpoints_up == 0 and not task.done()
        only.healthy = True
        result = await asyncio.wait_for(task, 5)
        await pool.aclose()
        return result

    assert asyncio.run(go()).output_ids == [7]


def test_no_endpoint_up_for_down_wait_fails_clearly():
    only = FakeEndpoint("only", healthy=False)
    pool = EndpointPool([only], max_retries=5, probe_interval=0.05, down_wait=0.2, remote=True)

    async def go():
        with pytest.raises(
            TransientBackendError, match=r"no healthy endpoint for 0.2s \(only: only: connection refused"
        ):
            await pool.generate(request())
        await pool.aclose()

    asyncio.run(go())


def test_check_health_takes_out_unhealthy_endpoints():
    up, down = FakeEndpoint("up"), FakeEndpoint("down", healthy=False)
    pool = EndpointPool([up, down], probe_interval=10, remote=True)

    async def go():
        n = await pool.check_health()
        results = await asyncio.gather(*(pool.generate(request(i)) for i in range(4)))
        await pool.aclose()
        return n, results

    n, results = asyncio.run(go())
    assert n == 1 and down.calls == 0 and {r.text for r in results} == {"up"}
    assert pool.stats()["endpoints"][1] == {
        "name": "down", "up": False, "requests": 0, "failures": 0, "last_error": "health check failed"
    }  # fmt: skip


def test_a_returning_endpoint_is_readmitted_only_once_its_vet_passes():
    """A server back after a restart is held to the run's checks (``EndpointPool.vet``) before it serves again."""
    other, back = FakeEndpoint("other"), FakeEndpoint("back", healthy=False)
    pool = EndpointPool([other, back], probe_interval=0.01, max_probe_interval=0.02, remote=True)
    verdicts = deque(["not re-admitted: it serves a smaller window", RuntimeError("boom"), None])
    seen: list[str | None] = []

    async def vet(backend) -> str | None:
        assert backend is back
        verdict = verdicts.popleft()
        if isinstance(verdict, Exception):
            raise verdict
        return verdict

    async def go():
        await pool.check_health()
        pool.vet = vet
        back.healthy = True
        while not pool.endpoints[1].up:
            seen.append(pool.endpoints[1].last_error)
            await asyncio.sleep(0.005)
        await pool.aclose()

    asyncio.run(asyncio.wait_for(go(), 10))
    assert not verdicts and back.probes >= 4  # the check-health probe, then one per verdict
    assert "not re-admitted: it serves a smaller window" in seen
    assert "re-admission check failed: RuntimeError: boom" in seen


def test_empty_pool_is_an_error():
    with pytest.raises(ValueError, match="at least one backend"):
        EndpointPool([], remote=True)


# --------------------------------------------------------------------------- circuit breaker and hangs


def test_a_single_5xx_keeps_the_endpoint_in_rotation_consecutive_ones_open_the_breaker():
    a = FakeEndpoint("a")
    a.fail.append(TransientBackendError("HTTP 503"))
    pool = EndpointPool([a], probe_interval=10, remote=True)

    async def go():
        first = await pool.generate(request(1))  # failed once, retried on the same endpoint: still up
        assert pool.endpoints[0].up and pool.endpoints[0].consecutive_failures == 0
        a.fail.extend(TransientBackendError(f"HTTP 503 #{i}") for i in range(3))
        with pytest.raises(TransientBackendError, match="no healthy endpoint"):
            pool.down_wait = 0.05
            await pool.generate(request(2))
        await pool.aclose()
        return first

    assert asyncio.run(go()).text == "a"
    assert not pool.endpoints[0].up and a.calls == 5 and pool.endpoints[0].failures == 4


def test_half_open_admits_one_trial_a_failed_trial_reopens_with_a_longer_cooldown():
    flaky, steady = FakeEndpoint("flaky", delay=0.02), FakeEndpoint("steady", delay=0.02)
    pool = EndpointPool([flaky, steady], probe_interval=0.3, failure_threshold=1, remote=True)

    async def go():
        flaky.fail.append(TransientBackendError("HTTP 500"))
        while flaky.fail:  # until a request lands on flaky: one failure opens it here (threshold 1)
            await pool.generate(request())
        state = pool.endpoints[0]
        assert not state.up
        for _ in range(100):  # the probe re-admits it half-open
            if state.up:
                break
            await asyncio.sleep(0.01)
        assert state.half_open
        flaky.fail.append(TransientBackendError("HTTP 500 again"))
        await asyncio.gather(*(pool.generate(request(i)) for i in range(6)))
        assert flaky.max_in_flight == 1  # one trial at a time while "steady" serves
        assert not state.up and state.cooldown == pytest.approx(0.6)  # the trial failed: open, cooldown doubled
        for _ in range(200):
            if state.up:
                break
            await asyncio.sleep(0.01)
        while state.half_open:  # drive a success through the trial
            await asyncio.gather(*(pool.generate(request(i)) for i in range(2)))
        await pool.aclose()

    asyncio.run(go())
    assert pool.endpoints[0].up and not pool.endpoints[0].half_open and pool.endpoints[0].cooldown == 0.3


@dataclass
class HangingEndpoint(FakeEndpoint):
    """Never answers the requests whose payload is in ``hang_on`` (a server that accepted and went silent)."""

    hang_on: set = field(default_factory=set)

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if request.input_ids[0] in self.hang_on:
            self.hang_on.discard(request.input_ids[0])
            self.calls += 1
            await asyncio.sleep(3600)
        return await super().generate(request)


def test_a_hung_request_is_abandoned_after_hang_factor_times_the_slowest_recent_and_retried():
    hanging = HangingEndpoint("h", delay=0.01, hang_on={99})
    pool = EndpointPool([hanging], hang_samples=4, hang_factor=4, min_hang_s=0.2, remote=True)

    async def go():
        for i in range(4):
            await pool.generate(request(i))  # history: four answers of ~0.01 s
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await pool.generate(request(99))
        elapsed = loop.time() - started
        await pool.aclose()
        return result, elapsed

    result, elapsed = asyncio.run(go())
    assert result.output_ids == [99] and pool.hangs == 1 and pool.retries == 1
    assert 0.2 <= elapsed < 5  # abandoned at the 0.2 s floor, not after the client's timeout
    assert "presumed hung" in pool.endpoints[0].last_error and pool.endpoints[0].up  # one failure: still in rotation


def test_no_hang_deadline_without_history_or_for_in_process_engines():
    pool = EndpointPool([FakeEndpoint("remote")], hang_samples=2, remote=True)
    state = pool.endpoints[0]
    assert pool._hang_deadline(state, request(), 0) is None
    pool._recent.extend([(4, 1.0), (4, 3.0), (1, 50.0)])  # only budgets >= half of 4 count
    assert pool._hang_deadline(state, request(), 0) == 9.0 and pool._hang_deadline(state, request(), 2) == 36.0

    class Local:
        name = "local"

    local = EndpointPool([Local()], remote=False, hang_samples=2)
    local._recent.extend([(4, 1.0), (4, 3.0)])
    assert local._hang_deadline(local.endpoints[0], request(), 0) is None
    # the pool's flag decides, not whether a backend happens to have a health() method
    engine = EndpointPool([FakeEndpoint("engine")], remote=False, hang_samples=2)
    engine._recent.extend([(4, 1.0), (4, 3.0)])
    assert engine._hang_deadline(engine.endpoints[0], request(), 0) is None


def test_a_remote_pool_refuses_an_endpoint_it_could_not_probe():
    class NoHealth:
        name = "forgetful"

    with pytest.raises(TypeError, match=r"forgetful: a remote endpoint is probed, and lacks health\(\), health_error"):
        EndpointPool([NoHealth()], remote=True)


def test_a_request_hung_before_any_history_is_caught_once_history_exists():
    hanging = HangingEndpoint("h", delay=0.01, hang_on={99})
    pool = EndpointPool([hanging], hang_samples=4, hang_factor=4, min_hang_s=0.2, remote=True)

    async def go():
        first_wave = asyncio.gather(pool.generate(request(99)), *(pool.generate(request(i)) for i in range(4)))
        results = await asyncio.wait_for(first_wave, 10)
        await pool.aclose()
        return results

    results = asyncio.run(go())
    assert [r.output_ids for r in results] == [[99], [0], [1], [2], [3]] and pool.hangs == 1


# ----- rollout affinity ----------------------------------------------------


def rollouts(pool: EndpointPool, n: int, calls: int, affinity: bool = True) -> list[list[str]]:
    """``n`` rollouts in flight, each making ``calls`` sequential requests; the endpoint of each call."""

    async def one(i: int) -> list[str]:
        return [(await pool.generate(request(i))).text for _ in range(calls)]

    async def go():
        pool.affinity = affinity
        try:
            return await asyncio.gather(*(rollout_affinity(one)(i) for i in range(n)))
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_affinity_keeps_each_rollout_on_one_endpoint_where_ties_would_rotate():
    endpoints = [FakeEndpoint(name, delay=0.005) for name in "abcd"]
    placed = rollouts(EndpointPool(endpoints, remote=True), n=2, calls=6)
    assert all(len(set(calls)) == 1 for calls in placed)  # every call of a rollout on its first endpoint
    assert placed[0][0] != placed[1][0]  # and the rollouts themselves spread
    scattered = rollouts(
        EndpointPool([FakeEndpoint(name, delay=0.005) for name in "abcd"], remote=True), 2, 6, affinity=False
    )
    assert any(len(set(calls)) > 1 for calls in scattered)  # the reference: least-loaded alone rotates ties


def test_affinity_yields_to_a_clearly_less_loaded_endpoint():
    pool = EndpointPool([FakeEndpoint("a"), FakeEndpoint("b")], affinity_slack=2, affinity_ratio=1.25, remote=True)

    @rollout_affinity
    async def rollout() -> list[str]:
        names = [(await pool.generate(request())).text]
        home = pool.endpoints["ab".index(names[0])]
        home.in_flight = 2  # 2 more than the idle other one: within the slack, the prefix wins
        names.append((await pool.generate(request())).text)
        home.in_flight = 3  # 3 more, and more than 1.25x: the rollout moves
        names.append((await pool.generate(request())).text)
        home.in_flight = 0
        names.append((await pool.generate(request())).text)  # and its affinity moved with it
        return names

    first, second, third, fourth = asyncio.run(rollout())
    assert second == first and third != first and fourth == third


def test_failover_moves_the_rollout_and_its_affinity():
    a, b = FakeEndpoint("a"), FakeEndpoint("b")
    pool = EndpointPool([a, b], remote=True)

    @rollout_affinity
    async def rollout() -> list[str]:
        names = [(await pool.generate(request())).text]
        home = a if names[0] == "a" else b
        home.fail.append(TransientBackendError(f"{home.name}: 503"))  # one failure: retried on the other one
        names += [(await pool.generate(request())).text for _ in range(3)]
        return names

    names = asyncio.run(rollout())
    assert names[1] != names[0] and names[1:] == [names[1]] * 3  # it stays where it failed over to


def test_cancelling_a_request_cancels_its_attempt_and_is_not_read_as_a_hang():
    hanging = HangingEndpoint("h", delay=0.01, hang_on={99})
    pool = EndpointPool([hanging], hang_samples=1, hang_factor=1, min_hang_s=0.05, remote=True)

    async def go():
        await pool.generate(request(0))  # history: the hang deadline is the 0.05 s floor
        call = asyncio.ensure_future(pool.generate(request(99)))
        await asyncio.sleep(0.02)
        call.cancel()
        try:
            await call
        except asyncio.CancelledError:
            cancelled = True
        else:
            cancelled = False
        await asyncio.sleep(0.1)  # past the deadline: the cancelled attempt's timer must not fire a retry
        await pool.aclose()
        return cancelled

    assert asyncio.run(go()) and pool.hangs == 0 and pool.retries == 0 and hanging.calls == 2  # no retry was sent
