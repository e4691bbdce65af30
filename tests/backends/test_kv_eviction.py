"""Resuming by evicting the deleted tokens' KV in place (freelm/backends/local_kv.py), against a fresh prefill.

The numeric checks run on the fixtures' tiny Qwen3 (random weights: what is compared is the KV and the logits, not
the text); the running-batch checks on the embedded default's trained model, whose confident logits make "batched
greedy == one-by-one greedy" a real equality.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("torch")

from repo_paths import CLEAN_TEMPLATE, EMBEDDED

from freelm.backends.base import Eviction, GenerateRequest, SamplingParams  # noqa: E402
from freelm.data import load_problems  # noqa: E402
from freelm.prompts import render_cleaning_prompt, render_reasoning_prompt  # noqa: E402

GREEDY = SamplingParams.greedy()
ASSETS = EMBEDDED
TEMPLATE = CLEAN_TEMPLATE
TEXT = "First, compute the sum: 12 + 30 = 42. Wait, check again. 12 + 30 = 42. So the answer is 42."


def previous_context(backend, new_tokens: int = 12) -> list[int]:
    """A request's context as the engine left it: prompt + greedy output, all cached but the last token."""
    backend.flush_cache()
    prompt = backend.encode(TEXT)
    result = backend.generate_blocking(GenerateRequest(max_new_tokens=new_tokens, input_ids=prompt, sampling=GREEDY))
    assert result.output_ids[-1] not in backend.eos_token_ids  # so the engine kept its KV
    return prompt + result.output_ids


def base_model(backend):
    """The reasoning model: the fixture's backend has the Free-Module loaded, off for reasoning."""
    return backend.model.disable_adapter()


def fresh_prefill(backend, ids: list[int], positions: list[int] | None = None):
    """Logits of the last token and the KV of a forward over ``ids`` from nothing (at ``positions``)."""
    import torch

    from freelm.backends.local_kv import empty_cache, with_cache

    cache = empty_cache(backend.model.config)
    extra = {} if positions is None else {"position_ids": torch.tensor([positions])}
    with torch.inference_mode(), base_model(backend):
        logits = backend.model(input_ids=torch.tensor([ids]), use_cache=True, **extra, **with_cache(cache)).logits
    return logits[0, -1], cache


def resumed(backend, ids: list[int], eviction: Eviction | None):
    """What the prefix cache gives ``ids`` with ``eviction``, and the logits of its last token computed from it."""
    import torch

    from freelm.backends.local_kv import with_cache

    taken = backend.prefix_cache.take(None, ids, eviction)
    feed, positions = ids[taken.reused :], taken.positions[taken.reused :]
    with torch.inference_mode(), base_model(backend):
        logits = backend.model(
            input_ids=torch.tensor([feed]), position_ids=torch.tensor([positions]), use_cache=True,
            **with_cache(taken.cache),
        ).logits  # fmt: skip
    return taken, logits[0, -1]


def test_eviction_ranges_are_checked():
    with pytest.raises(ValueError, match="strategy"):
        Eviction("reprefill", ((1, 2),))
    for bad in (((3, 2),), ((1, 4), (3, 5)), ((-1, 2),), ((2, 2),)):
        with pytest.raises(ValueError, match="sorted disjoint"):
            Eviction("evict-gaps", bad)
    assert Eviction("evict-gaps", ((1, 2), (2, 5))).removed == ((1, 2), (2, 5))  # touching ranges are fine


@pytest.mark.parametrize("strategy", ["evict-gaps", "evict-rerotate"])
def test_a_deletion_of_nothing_resumes_as_re_prefill_does(local_backend, strategy):
    """An eviction that removes nothing (or a request without one) continues the cached sequence unchanged."""
    context = previous_context(local_backend)
    want = local_backend.generate_blocking(GenerateRequest(max_new_tokens=6, input_ids=context, sampling=GREEDY))
    for eviction in (None, Eviction(strategy, ())):
        previous_context(local_backend)
        got = local_backend.generate_blocking(
            GenerateRequest(max_new_tokens=6, input_ids=context, sampling=GREEDY, eviction=eviction)
        )
        assert got.output_ids == want.output_ids and got.cached_tokens == len(context) - 1
        assert got.evicted_tokens == got.rerotated_tokens == 0


def test_rerotation_after_a_deletion_at_the_very_end_gives_the_logits_of_a_fresh_prefill(local_backend):
    """Nothing kept saw the deleted tail (attention is causal), so the evicted KV is a prefill's, to float tolerance."""
    import torch

    context = previous_context(local_backend)
    kept = context[:-4]  # the last four tokens deleted, the never-fed last one among them
    taken, logits = resumed(local_backend, kept, Eviction("evict-rerotate", ((len(kept), len(context)),)))
    want, _ = fresh_prefill(local_backend, kept)
    assert taken.reused == len(kept) - 1 and taken.evicted == 3 and taken.rerotated == 0
    assert taken.positions == list(range(len(kept)))
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_rerotated_keys_equal_a_fresh_prefills_keys_at_layer_0_and_differ_after(local_backend):
    """Layer 0's keys depend on the token and its position only: re-rotated to contiguous positions they are what a
    prefill of the kept tokens computes. From layer 1 on, a kept entry still holds what the deleted tokens gave it."""
    import torch

    context = previous_context(local_backend)
    start, end = 5, 11
    kept = context[:start] + context[end:]
    taken, logits = resumed(local_backend, kept, Eviction("evict-rerotate", ((start, end),)))
    want_logits, fresh = fresh_prefill(local_backend, kept)
    n = taken.reused
    assert n == len(kept) - 1 and taken.evicted == end - start and taken.rerotated == n - start
    got, ref = taken.cache.layers[0], fresh.layers[0]  # (the forward in resumed() added the last token's entry)
    torch.testing.assert_close(got.keys, ref.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.values, ref.values, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(taken.cache.layers[1].keys[:, :, start:n], fresh.layers[1].keys[:, :, start:n], atol=1e-4)
    assert not torch.allclose(logits, want_logits, atol=1e-4)  # the deleted tokens still speak through layer 1


def test_gaps_keep_the_survivors_positions_and_continue_the_counter_from_the_old_end(local_backend):
    """Memento's scheme: logical positions feed RoPE (survivors keep theirs, new tokens continue from the old end),
    physical order indexes the cache; the stored sequence says which position each entry was computed at."""
    import torch

    context = previous_context(local_backend)
    old_end = len(context)  # positions 0 .. old_end - 1 were given out (the last one to the never-fed token)
    start, end = 5, 11
    kept = context[:start] + context[end:]
    taken, _ = resumed(local_backend, kept, Eviction("evict-gaps", ((start, end),)))
    survivors = [*range(start), *range(end, old_end)]
    assert taken.positions == survivors and taken.next_position == old_end and taken.rerotated == 0
    _, fresh = fresh_prefill(local_backend, kept, positions=survivors)  # layer 0 at the same gapped positions
    torch.testing.assert_close(taken.cache.layers[0].keys, fresh.layers[0].keys, atol=1e-5, rtol=0)

    # through the engine: the request decodes on from the old end, and what it leaves says so
    previous_context(local_backend)
    request = GenerateRequest(
        max_new_tokens=5, input_ids=kept, sampling=GREEDY, eviction=Eviction("evict-gaps", ((start, end),))
    )
    result = local_backend.generate_blocking(request)
    assert result.evicted_tokens == end - start and result.cached_tokens == len(kept) - 1
    (stored,) = local_backend.prefix_cache.sequences(None)
    assert stored.ids == kept + result.output_ids[:-1]
    assert stored.positions == survivors + list(range(old_end, old_end + 4)) and stored.next_position == old_end + 4

    # a deletion at the end: the last survivor is computed again at its own position, the output goes on at the
    # old end (the deleted tokens' positions are never given out again)
    context = previous_context(local_backend)
    kept = context[:-3]
    taken, _ = resumed(local_backend, kept, Eviction("evict-gaps", ((len(kept), len(context)),)))
    assert taken.positions == list(range(len(kept))) and taken.next_position == len(context)


def test_a_hint_that_does_not_match_costs_a_prefill_never_a_wrong_token(local_backend):
    context = previous_context(local_backend)
    kept = context[:5] + context[11:]
    previous_context(local_backend)
    wrong = Eviction("evict-rerotate", ((2, 9),))  # not what was deleted: the kept ids do not match
    got = local_backend.generate_blocking(
        GenerateRequest(max_new_tokens=6, input_ids=kept, sampling=GREEDY, eviction=wrong)
    )
    assert got.evicted_tokens == 0 and got.cached_tokens == 5  # the plain common prefix only
    local_backend.flush_cache()
    fresh = local_backend.generate_blocking(GenerateRequest(max_new_tokens=6, input_ids=kept, sampling=GREEDY))
    assert got.output_ids == fresh.output_ids


def test_with_nothing_cached_every_strategy_is_a_fresh_prefill(local_backend):
    context = previous_context(local_backend)
    kept = context[:5] + context[11:]
    outputs = []
    for strategy in ("evict-gaps", "evict-rerotate"):
        local_backend.flush_cache()
        request = GenerateRequest(
            max_new_tokens=6, input_ids=kept, sampling=GREEDY, eviction=Eviction(strategy, ((5, 11),))
        )
        got = local_backend.generate_blocking(request)
        assert got.cached_tokens == 0 and got.evicted_tokens == 0
        outputs.append(got.output_ids)
    local_backend.flush_cache()
    assert (
        outputs
        == [
            local_backend.generate_blocking(
                GenerateRequest(max_new_tokens=6, input_ids=kept, sampling=GREEDY)
            ).output_ids
        ]
        * 2
    )


@pytest.mark.parametrize("strategy", ["evict-gaps", "evict-rerotate"])
def test_kv_computed_with_deleted_tokens_visible_stays_the_rollouts_own(local_backend, strategy):
    """The prefix cache matches by ids, but after an eviction the entries past the first deletion hold what the
    deleted tokens gave them (and, with gaps, other positions): the rollout's own next call continues them, while a
    request that only shares their ids branches off at the first deletion and computes the rest itself."""
    context = previous_context(local_backend)
    kept = context[:5] + context[11:]
    evicting = GenerateRequest(
        max_new_tokens=4, input_ids=kept, sampling=GREEDY, eviction=Eviction(strategy, ((5, 11),))
    )
    first = local_backend.generate_blocking(evicting)
    (stored,) = local_backend.prefix_cache.sequences(None)
    assert stored.exact_entries == 5  # the lead the deletion did not touch
    branch = kept + [context[0]]  # shares the ids of all the evicted request's input, then differs
    other = local_backend.generate_blocking(GenerateRequest(max_new_tokens=3, input_ids=branch, sampling=GREEDY))
    assert other.cached_tokens == 5
    local_backend.flush_cache()
    assert (
        other.output_ids
        == local_backend.generate_blocking(
            GenerateRequest(max_new_tokens=3, input_ids=branch, sampling=GREEDY)
        ).output_ids
    )  # what a fresh prefill decodes
    local_backend.flush_cache()
    local_backend.prefix_cache.keep(None, stored)
    own = kept + first.output_ids
    again = local_backend.generate_blocking(GenerateRequest(max_new_tokens=3, input_ids=own, sampling=GREEDY))
    assert again.cached_tokens == len(own) - 1  # the rollout goes on from its own KV


def test_a_model_that_cannot_rerotate_refuses_the_request_alone(local_backend, monkeypatch):
    """Frequencies that change with the length (dynamic, longrope) leave no rotation to apply: that request fails
    with a BackendError naming the strategy; gaps and the other requests of the batch go on."""
    from freelm.backends.base import BackendError

    context = previous_context(local_backend)
    kept = context[:5] + context[11:]
    monkeypatch.setattr(local_backend.prefix_cache, "inv_freq", None)
    requests = [
        GenerateRequest(max_new_tokens=4, input_ids=kept, sampling=GREEDY, eviction=Eviction(strategy, ((5, 11),)))
        for strategy in ("evict-rerotate", "evict-gaps")
    ]
    with pytest.raises(BackendError, match="evict-rerotate needs RoPE"):
        local_backend.generate_blocking(requests[0])
    refused, gaps = local_backend.generate_batch_blocking(requests)
    assert isinstance(refused, BackendError) and gaps.output_ids


# --------------------------------------------------------------------------- the running batch (embedded model)


@pytest.fixture(scope="module")
def first_calls(embedded_backend) -> list[GenerateRequest]:
    problems = load_problems(str(ASSETS / "benchmark.jsonl"), limit=4)
    return [
        GenerateRequest(
            max_new_tokens=30 + 4 * i, input_ids=embedded_backend.encode(render_reasoning_prompt(p.prompt, embedded_backend.tokenizer)),
            sampling=GREEDY,
        )
        for i, p in enumerate(problems)
    ]  # fmt: skip


def resumptions(embedded_backend, first_calls, strategy: str) -> list[GenerateRequest]:
    """Each rollout's next call after a deletion: in the middle, at the very end, none, and one followed by new
    (re-encoded) tokens, whose positions continue the counter under gaps and which join the batch as a longer
    suffix."""
    embedded_backend.flush_cache()
    out = []
    for i, (request, result) in enumerate(
        zip(first_calls, embedded_backend.generate_batch_blocking(first_calls), strict=True)
    ):
        assert result.output_ids[-1] not in embedded_backend.eos_token_ids
        context = request.input_ids + result.output_ids
        start = len(request.input_ids) + 4
        if i == 0:
            removed, ids = ((start, start + 8),), context[:start] + context[start + 8 :]
        elif i == 1:
            removed, ids = ((len(context) - 4, len(context)),), context[:-4]
        elif i == 2:
            removed, ids = (), context
        else:
            removed, ids = ((start, start + 8),), context[:start] + context[start + 8 : -1] + context[start : start + 3]
        eviction = Eviction(strategy, removed) if removed else None
        out.append(GenerateRequest(max_new_tokens=12, input_ids=ids, sampling=GREEDY, eviction=eviction))
    return out


@pytest.mark.parametrize("strategy", ["evict-gaps", "evict-rerotate"])
def test_evicting_in_the_running_batch_equals_evicting_one_by_one(embedded_backend, first_calls, strategy):
    """Rows evict as they join (directly, through the decode steps, or prefilled), beside cleaning rows and rows that
    join later, and decode what the same requests decode one at a time."""
    follow = resumptions(embedded_backend, first_calls, strategy)
    want = []
    for first, request in zip(first_calls, follow, strict=True):
        embedded_backend.flush_cache()
        embedded_backend.generate_blocking(first)
        want.append(embedded_backend.generate_blocking(request))
    assert [w.evicted_tokens > 0 for w in want] == [True, True, False, True]
    assert (strategy == "evict-rerotate") == any(w.rerotated_tokens for w in want)
    problems = load_problems(str(ASSETS / "benchmark.jsonl"), limit=2)
    cleaning = [
        GenerateRequest(
            max_new_tokens=24, adapter="free", sampling=GREEDY,
            input_ids=embedded_backend.encode(render_cleaning_prompt(p.prompt, "#40 3\n#39 40\n", template=TEMPLATE)),
        )
        for p in problems
    ]  # fmt: skip
    for scheduling in ("waves", "continuous"):
        resumptions(embedded_backend, first_calls, strategy)  # the previous calls' KV in the prefix cache again
        embedded_backend.scheduling = scheduling

        async def main():
            calls = [embedded_backend.generate(r) for r in follow[:2] + cleaning]
            await asyncio.sleep(0.01)  # the others join a running batch
            return await asyncio.gather(*calls, *(embedded_backend.generate(r) for r in follow[2:]))

        try:
            got = asyncio.run(main())
        finally:
            embedded_backend.scheduling = "waves"
        resumed_rows = got[:2] + got[-2:]
        assert [g.output_ids for g in resumed_rows] == [w.output_ids for w in want]
        assert [(g.cached_tokens, g.evicted_tokens, g.rerotated_tokens) for g in resumed_rows] == [
            (w.cached_tokens, w.evicted_tokens, w.rerotated_tokens) for w in want
        ]


def rollouts(backend, strategy: str, cleaner, problems, scheduling: str = "waves", max_batch: int = 8):
    from freelm.loop import LoopConfig, run_rollout

    config = LoopConfig(clean_every=32, max_tokens=256, context_limit=216, sampling=GREEDY, resume=strategy)
    backend.flush_cache()
    backend.scheduling, backend.max_batch = scheduling, max_batch

    async def main():
        return await asyncio.gather(
            *(run_rollout(p.prompt, reasoner=backend, tokenizer=backend.tokenizer, cleaner=cleaner, config=config)
              for p in problems)
        )  # fmt: skip

    try:
        return asyncio.run(main())
    finally:
        backend.scheduling, backend.max_batch = "waves", 8


def texts(results) -> list[list[str]]:
    return [[r.generated_text for r in result.rounds] for result in results]


@pytest.mark.parametrize("strategy", ["evict-gaps", "evict-rerotate"])
def test_the_record_says_per_round_what_was_evicted_rerotated_and_prefilled_again(embedded_backend, strategy):
    """The oracle deletes every line but the last at each cleaning: after it, re-prefill computes the whole
    thinking after the first deleted line again; eviction removes exactly the deleted tokens and computes nothing
    again; re-rotation moves every kept entry after the deletion."""
    from freelm.cleaners import get_cleaner

    problems = load_problems(str(ASSETS / "benchmark.jsonl"), limit=4)
    oracle = get_cleaner("oracle").cls()
    again = rollouts(embedded_backend, "reprefill", oracle, problems)
    evicting = rollouts(embedded_backend, strategy, oracle, problems)
    cleaned = 0
    for plain, evicted in zip(again, evicting, strict=True):
        assert plain.rounds[0].reprefilled_tokens == evicted.rounds[0].reprefilled_tokens == 0
        for before, after in zip(evicted.rounds, evicted.rounds[1:]):
            deleted = before.clean is not None and before.clean.tokens_deleted > 0
            cleaned += deleted
            assert after.reprefilled_tokens == 0 and after.cached_tokens == after.prompt_tokens - 1
            assert after.evicted_tokens == (before.clean.tokens_deleted if deleted else 0)
            moved = after.prompt_tokens - 1 - after.reused_tokens if deleted and strategy == "evict-rerotate" else 0
            assert after.rerotated_tokens == moved
        for before, after in zip(plain.rounds, plain.rounds[1:]):
            deleted = before.clean is not None and before.clean.tokens_deleted > 0
            assert after.evicted_tokens == after.rerotated_tokens == 0
            assert after.reprefilled_tokens == after.prompt_tokens - after.cached_tokens - 1
            assert (after.reprefilled_tokens > 0) == deleted  # everything after the first deleted line (its "#" may
            # be cached: the next kept line starts with the same token)
    assert cleaned >= len(problems)


@pytest.mark.parametrize("strategy", ["evict-gaps", "evict-rerotate"])
def test_evicting_rollouts_are_the_same_one_by_one_in_waves_and_continuously(embedded_backend, strategy):
    """The demo's loop with the Free-Module: the running batch (joins by cost, waves or continuous scheduling with
    mixed adapters, the prefix LRU) evicts as a lone request does."""
    from freelm.cleaners import get_cleaner

    problems = load_problems(str(ASSETS / "benchmark.jsonl"), limit=6)
    entry = get_cleaner("free")
    cleaner = entry.cls(embedded_backend, adapter="free", template=TEMPLATE, max_new_tokens=48)
    alone = rollouts(embedded_backend, strategy, cleaner, problems, max_batch=1)
    waves = rollouts(embedded_backend, strategy, cleaner, problems)
    continuous = rollouts(embedded_backend, strategy, cleaner, problems, scheduling="continuous")
    assert texts(waves) == texts(alone) == texts(continuous)
    evicted = [[r.evicted_tokens for r in result.rounds] for result in waves]
    assert evicted == [[r.evicted_tokens for r in result.rounds] for result in continuous] and any(map(any, evicted))
    assert all(r.reprefilled_tokens == 0 for result in waves for r in result.rounds)


def test_a_cleaning_that_deletes_nothing_leaves_every_strategy_identical_to_re_prefill(embedded_backend):
    from freelm.cleaners.base import CleanOutcome
    from freelm.free import apply_deletions

    class Nothing:
        name = "nothing"

        async def clean(self, problem: str, thinking: str) -> CleanOutcome:
            return CleanOutcome(edit=apply_deletions(thinking, []))

    problems = load_problems(str(ASSETS / "benchmark.jsonl"), limit=3)
    runs = {
        s: rollouts(embedded_backend, s, Nothing(), problems) for s in ("reprefill", "evict-gaps", "evict-rerotate")
    }
    records = {
        s: [[(r.generated_text, r.cached_tokens, r.evicted_tokens, r.rerotated_tokens, r.reprefilled_tokens)
             for r in result.rounds] for result in results]
        for s, results in runs.items()
    }  # fmt: skip
    assert records["evict-gaps"] == records["reprefill"] == records["evict-rerotate"]
    assert all(len(result.rounds) > 3 for result in runs["reprefill"])
