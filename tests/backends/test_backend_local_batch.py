"""LocalBackend's batched decoding: same outputs as one request at a time, one adapter per wave, errors kept apart.

It runs on the embedded default's trained model (committed under freelm/assets/embedded): a trained model has
confident logits, so "batched greedy == one-by-one greedy" is a real equality, not a tie broken by luck.
"""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("torch")

from repo_paths import CLEAN_TEMPLATE, EMBEDDED

from freelm.backends.base import BackendError, GenerateRequest, SamplingParams  # noqa: E402
from freelm.data import load_problems  # noqa: E402
from freelm.prompts import render_cleaning_prompt, render_reasoning_prompt  # noqa: E402

ASSETS = EMBEDDED
TEMPLATE = CLEAN_TEMPLATE
GREEDY = SamplingParams.greedy()


@pytest.fixture(scope="module")
def backend(embedded_backend):
    return embedded_backend


@pytest.fixture(scope="module")
def requests(backend) -> list[GenerateRequest]:
    """Reasoning prompts cut at different lengths, cleaning prompts, a stop string and different budgets."""
    problems = load_problems(str(ASSETS / "benchmark.jsonl"), limit=6)
    out = []
    for i, p in enumerate(problems):
        prompt = backend.encode(render_reasoning_prompt(p.prompt, backend.tokenizer))
        thinking = "".join(f"#{40 - t} {(7 * t + i) % 100}\n" for t in range(3 + i))  # any lines: a cleaning prompt
        cleaning = backend.encode(render_cleaning_prompt(p.prompt, thinking, template=TEMPLATE))
        out.append(GenerateRequest(max_new_tokens=20 + 7 * i, input_ids=prompt, sampling=GREEDY))
        out.append(GenerateRequest(max_new_tokens=48, input_ids=cleaning, sampling=GREEDY, adapter="free"))
    out[2].stop.append("\n#4")  # one request ends on a stop string inside the batch
    return out


def one_by_one(backend, requests):
    backend.flush_cache()
    return [backend.generate_blocking(r) for r in requests]


def test_batched_greedy_equals_one_by_one(backend, requests):
    expected = one_by_one(backend, requests)
    for adapter in (None, "free"):
        group = [r for r in requests if r.adapter == adapter]
        want = [e for e, r in zip(expected, requests, strict=True) if r.adapter == adapter]
        backend.flush_cache()
        got = backend.generate_batch_blocking(group)
        assert [g.output_ids for g in got] == [w.output_ids for w in want]
        assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
        assert all(g.cached_tokens == 0 and g.prompt_tokens == w.prompt_tokens for g, w in zip(got, want, strict=True))
        # the same wave again: every row starts from the KV the first wave left (except eos-ended reasoning)
        again = backend.generate_batch_blocking(group)
        assert [g.output_ids for g in again] == [w.output_ids for w in want]
        kept = [adapter is not None or w.output_ids[-1] not in backend.eos_token_ids for w in want]
        assert [g.cached_tokens for g in again] == [w.prompt_tokens - 1 if k else 0 for w, k in zip(want, kept)]
        assert all(kept) or adapter is None
    assert {e.finish_reason for e in expected} == {"stop", "length"}  # rows leave the batch at different steps


def test_kv_kept_across_waves_prefills_only_the_changed_suffix(backend, requests):
    """Wave 2 continues some rows and deletes a middle span of others; outputs equal fresh one-by-one decoding."""
    reasoning = [r for r in requests if r.adapter is None]
    backend.flush_cache()
    first = backend.generate_batch_blocking(reasoning)
    follow, expected_cached = [], []
    for i, (request, result) in enumerate(zip(reasoning, first, strict=True)):
        if result.output_ids[-1] in backend.eos_token_ids:
            continue  # a finished rollout: nothing continues it (and its KV was not kept)
        context = request.input_ids + result.output_ids
        if i % 2:  # a deletion: only the common prefix with what the row's KV holds is reused
            cut = len(request.input_ids) + 1
            context = context[:cut] + context[cut + 4 :]
            held = request.input_ids + result.output_ids[:-1]
            expected_cached.append(len(os.path.commonprefix([context, held])))
            assert expected_cached[-1] < len(held)
        else:  # reasoning continues: all but the last token (never fed) is cached
            expected_cached.append(len(context) - 1)
        follow.append(GenerateRequest(max_new_tokens=12, input_ids=context, sampling=GREEDY))
    assert len(follow) >= 3 and len(set(expected_cached)) > 1
    stats_before = backend.stats[None].prefill_tokens
    got = backend.generate_batch_blocking(follow)
    assert [g.cached_tokens for g in got] == expected_cached
    assert backend.stats[None].prefill_tokens - stats_before == sum(len(f.input_ids) for f in follow) - sum(
        expected_cached
    )
    assert [g.output_ids for g in got] == [r.output_ids for r in one_by_one(backend, follow)]


def test_the_cache_is_bounded_in_sequences_and_bytes(backend, requests):
    reasoning = [r for r in requests if r.adapter is None]
    backend.flush_cache()
    size, limit = backend.cache_size, backend.cache_bytes
    try:
        backend.cache_size = 2
        backend.generate_batch_blocking(reasoning)
        assert len(backend.prefix_cache.sequences(None)) == 2
        backend.cache_size = 64
        backend.flush_cache()
        backend.generate_batch_blocking(reasoning)
        one = max(seq.nbytes for seq in backend.prefix_cache.sequences(None))
        backend.cache_bytes = 2 * one
        backend.generate_batch_blocking([r for r in requests if r.adapter == "free"])
        held = [seq.nbytes for ns in (None, "free") for seq in backend.prefix_cache.sequences(ns)]
        assert 1 <= len(held) <= 2 and sum(held) <= 2 * one
        backend.cache_bytes = 0  # nothing kept: every wave prefilled from scratch
        assert all(g.cached_tokens == 0 for g in backend.generate_batch_blocking(reasoning))
    finally:
        backend.cache_size, backend.cache_bytes = size, limit
        backend.flush_cache()


def test_concurrent_calls_share_decode_steps_across_adapters(backend, requests):
    """Continuous batching: reasoning and cleaning rows decode in the same forward steps, outputs unchanged."""
    expected = one_by_one(backend, requests)

    default = backend.scheduling

    def concurrently(scheduling: str) -> tuple[list, int]:
        backend.flush_cache()
        backend.scheduling, backend.stats, backend.max_batch = scheduling, {}, len(requests)
        before = backend.step_stats.decode_steps

        async def main():
            return await asyncio.gather(*(backend.generate(r) for r in requests))

        try:
            return asyncio.run(main()), backend.step_stats.decode_steps - before
        finally:
            backend.scheduling, backend.max_batch = default, 8

    waves, wave_steps = concurrently("waves")
    got, steps = concurrently("continuous")
    assert [g.output_ids for g in got] == [g.output_ids for g in waves] == [e.output_ids for e in expected]
    # each namespace counts the steps it took part in: together more than the steps run, so they shared steps
    assert backend.stats[None].decode_steps + backend.stats["free"].decode_steps > steps
    # all rows in flight at once: about the longest output's steps, where waves run one adapter after the other
    assert steps <= max(len(e.output_ids) for e in expected) + 1 < wave_steps


def run_staggered(backend, schedule: dict[int, list[GenerateRequest]]) -> list:
    """Drive the batch engine by hand: ``schedule[k]`` joins at step k. Returns the results in schedule order."""
    import torch

    from freelm.backends.local_batch import RunningBatch

    order = [r for k in sorted(schedule) for r in schedule[k]]
    results: list = [None] * len(order)
    batch = RunningBatch(backend)
    step = 0
    with backend._lock, torch.inference_mode():
        while step <= max(schedule) or batch.members:
            joiners = [backend._row(r, 0.0, order.index(r)) for r in schedule.get(step, [])]
            for row in batch.step(joiners):
                results[row.ticket] = row.output
            step += 1
    return results


def test_rows_joining_at_different_steps_with_mixed_adapters_equal_one_by_one(backend, requests):
    """Base and adapter rows join a running batch at different steps, some stop early, some continue a cached
    sequence (joining the decode step directly, or feeding a short changed suffix through it): greedy outputs
    equal one-by-one decoding."""
    backend.flush_cache()
    first = backend.generate_blocking(requests[0])
    assert first.output_ids[-1] not in backend.eos_token_ids
    context = requests[0].input_ids + first.output_ids
    continued = GenerateRequest(max_new_tokens=16, input_ids=context, sampling=GREEDY)  # 1 uncached token
    edited = GenerateRequest(max_new_tokens=16, input_ids=context[:-4] + context[-2:] + [5], sampling=GREEDY)
    schedule = {
        0: [requests[0], requests[1]],
        2: [requests[2], requests[3]],  # requests[2] ends on a stop string
        3: [continued],
        5: [requests[5], edited, requests[4]],
        9: [requests[6], requests[7]],
    }
    order = [r for k in sorted(schedule) for r in schedule[k]]
    expected = [r.output_ids for r in one_by_one(backend, order)]
    backend.flush_cache()
    backend.generate_blocking(requests[0])  # the cached sequence the continuations join from
    stats = backend.step_stats
    direct, prefills = stats.joined_direct, stats.prefill_forwards
    assert run_staggered(backend, schedule) == expected
    assert stats.joined_direct - direct >= 2  # the continuation (and the short edit) joined without a prefill forward
    assert stats.prefill_forwards - prefills >= 2
    finishes = {r.finish_reason for r in one_by_one(backend, order)}
    assert finishes == {"stop", "length"}


def test_seeded_sampling_joining_at_different_steps_is_reproducible(backend, requests):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    sampled = [
        GenerateRequest(max_new_tokens=20, input_ids=r.input_ids, sampling=sampling, seed=s, adapter=r.adapter)
        for s, r in enumerate(requests[:6])
    ]
    schedule = {0: sampled[:2], 1: sampled[2:3], 4: sampled[3:5], 6: sampled[5:]}
    expected = [r.output_ids for r in one_by_one(backend, [r for k in sorted(schedule) for r in schedule[k]])]
    backend.flush_cache()
    assert run_staggered(backend, schedule) == expected
    backend.flush_cache()
    assert run_staggered(backend, schedule) == expected


def test_a_cancelled_caller_leaves_the_batch(backend, requests):
    async def main():
        tasks = [asyncio.create_task(backend.generate(r)) for r in requests[:4]]
        await asyncio.sleep(0.05)
        tasks[1].cancel()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    got = asyncio.run(main())
    assert isinstance(got[1], asyncio.CancelledError)
    assert [g.output_ids for i, g in enumerate(got) if i != 1] == [
        r.output_ids for r in one_by_one(backend, [requests[0], requests[2], requests[3]])
    ]


def test_a_bad_request_fails_alone(backend, requests):
    too_long = GenerateRequest(max_new_tokens=4, input_ids=[5] * backend.context_length, sampling=GREEDY)
    got = backend.generate_batch_blocking([requests[0], too_long, requests[2]])
    assert isinstance(got[1], BackendError) and "context length" in str(got[1])
    assert [got[0].output_ids, got[2].output_ids] == [
        r.output_ids for r in one_by_one(backend, [requests[0], requests[2]])
    ]

    async def main():
        return await asyncio.gather(backend.generate(requests[0]), backend.generate(too_long), return_exceptions=True)

    ok, failed = asyncio.run(main())
    assert ok.output_ids == got[0].output_ids and isinstance(failed, BackendError)


def test_seeded_sampling_in_a_batch_matches_one_by_one(backend, requests):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, top_k=20)
    sampled = [
        GenerateRequest(max_new_tokens=24, input_ids=r.input_ids, sampling=sampling, seed=s)
        for s, r in enumerate(requests[::2])
    ]
    assert [g.output_ids for g in backend.generate_batch_blocking(sampled)] == [
        r.output_ids for r in one_by_one(backend, sampled)
    ]


def test_a_batch_may_mix_adapters(backend, requests):
    assert [g.output_ids for g in backend.generate_batch_blocking(requests)] == [
        r.output_ids for r in one_by_one(backend, requests)
    ]


def test_the_same_request_sent_three_times_gets_three_answers(backend, requests):
    async def main():
        return await asyncio.wait_for(asyncio.gather(*(backend.generate(requests[0]) for _ in range(3))), 60)

    got = asyncio.run(main())
    assert len({tuple(g.output_ids) for g in got}) == 1 and len(got) == 3


def test_free_lm_rollouts_are_identical_with_kv_kept_and_with_continuous_batching(backend):
    """The demo's loop (greedy, clean every 32 tokens): KV reuse and continuous batching change the time, not one token."""
    from freelm.cleaners import FreeModuleCleaner
    from freelm.loop import LoopConfig, run_rollout

    problems = load_problems(str(ASSETS / "benchmark.jsonl"), limit=8)
    cleaner = FreeModuleCleaner(backend, adapter="free", template=TEMPLATE, max_new_tokens=48)
    config = LoopConfig(clean_every=32, max_tokens=256, context_limit=512, sampling=GREEDY)

    def rollouts(cache_bytes: int, scheduling: str = "waves"):
        backend.flush_cache()
        backend.cache_bytes, backend.stats, backend.scheduling = cache_bytes, {}, scheduling

        async def main():
            return await asyncio.gather(
                *(run_rollout(p.prompt, reasoner=backend, tokenizer=backend.tokenizer, cleaner=cleaner, config=config)
                  for p in problems)
            )  # fmt: skip

        return asyncio.run(main()), backend.stats

    limit = backend.cache_bytes
    try:
        fresh, fresh_stats = rollouts(0)  # every wave prefilled from scratch: the backend without KV reuse
        kept, kept_stats = rollouts(limit)
        continuous, _ = rollouts(limit, "continuous")  # cleaning rows decode in the reasoning rows' steps
    finally:
        backend.cache_bytes, backend.scheduling = limit, "waves"
    assert [[x.generated_text for x in r.rounds] for r in continuous] == [
        [x.generated_text for x in r.rounds] for r in kept
    ]
    assert [r.response for r in kept] == [r.response for r in fresh]
    assert [[x.generated_text for x in r.rounds] for r in kept] == [[x.generated_text for x in r.rounds] for r in fresh]
    assert sum(r.cleaning_rounds for r in kept) >= len(problems)  # cleaning did happen
    for namespace in (None, "free"):
        assert fresh_stats[namespace].cached_tokens == 0
        assert kept_stats[namespace].prefill_tokens < fresh_stats[namespace].prefill_tokens
    assert kept_stats[None].cached_tokens > 2 * kept_stats[None].prefill_tokens  # most of the context is reused


def test_a_request_the_sampler_refuses_fails_alone_and_the_scheduler_goes_on(backend, requests):
    """top_p < 0 makes HF's warper raise ValueError while the row is built: that caller gets a BackendError, the
    batch (continuous or waves) finishes everyone else instead of the scheduler task dying and stalling them."""
    bad = GenerateRequest(
        max_new_tokens=4, input_ids=requests[0].input_ids, sampling=SamplingParams(temperature=1.0, top_p=-0.5)
    )
    got = backend.generate_batch_blocking([requests[0], bad])
    assert isinstance(got[1], BackendError) and "top_p" in str(got[1])

    async def main():
        calls = [backend.generate(requests[0]), backend.generate(bad), backend.generate(requests[2])]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)

    ok, failed, other = asyncio.run(main())
    assert isinstance(failed, BackendError) and "top_p" in str(failed)
    assert [ok.output_ids, other.output_ids] == [r.output_ids for r in one_by_one(backend, [requests[0], requests[2]])]


def test_a_row_whose_result_cannot_be_built_fails_alone(backend, requests, monkeypatch):
    """An error while turning one finished row into its result (e.g. decoding its ids) reaches that caller only;
    the scheduler task goes on and the other callers get their answers instead of waiting forever."""
    real = backend._result
    bad_prompt = requests[2].input_ids

    def result(ids, *args):
        if ids == bad_prompt:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real(ids, *args)

    monkeypatch.setattr(backend, "_result", result)

    async def main():
        calls = [backend.generate(r) for r in requests[:4]]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 60)

    got = asyncio.run(main())
    assert isinstance(got[2], UnicodeDecodeError)
    assert all(not isinstance(g, BaseException) for i, g in enumerate(got) if i != 2)
