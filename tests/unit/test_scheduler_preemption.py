"""Preemption by recompute: outputs never change, and the right request is the victim."""

from __future__ import annotations

import random

import pytest
from fake_model import FakeModel, reference_output

from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.types import Request, RequestStatus

BLOCK_SIZE = 4
NUM_REQUESTS = 64


def _workload(seed: int = 1234) -> list[tuple[str, list[int], int, int, int | None]]:
    """64 (request_id, prompt, max_tokens, priority, eos) with varied lengths, a shared prefix
    for a third of them and an EOS token for a quarter of them."""
    rng = random.Random(seed)
    shared = [rng.randrange(97) for _ in range(24)]
    specs = []
    for i in range(NUM_REQUESTS):
        plen = rng.randint(1, 40)
        if i % 3 == 0:
            k = min(plen, rng.choice([4, 8, 13, 24]))
            prompt = shared[:k] + [rng.randrange(97) for _ in range(plen - k)]
        else:
            prompt = [rng.randrange(97) for _ in range(plen)]
        eos = 7 if i % 4 == 0 else None
        specs.append((f"req-{i:02d}", prompt, rng.randint(1, 40), rng.randint(0, 3), eos))
    return specs


def _run(specs, cfg: SchedulerConfig, num_blocks: int, prefix_caching: bool):
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    model = FakeModel(num_blocks, BLOCK_SIZE)
    sched = Scheduler(cfg, kv)
    reqs = {}
    for rid, prompt, max_tokens, prio, eos in specs:
        reqs[rid] = Request(rid, prompt, max_tokens=max_tokens, priority=prio, eos_token_id=eos)
        assert sched.add_request(reqs[rid]) is True
    streamed: dict[str, list[int]] = {rid: [] for rid in reqs}
    finished: list[str] = []
    bound = 4 * sum(len(p) + m for _, p, m, _, _ in specs)
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        assert len(out.chunks) <= cfg.max_num_seqs
        assert out.num_batched_tokens == sum(c.num_tokens for c in out.chunks)
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        for rid in out.preempted_ids:
            victim = reqs[rid]
            assert victim.status == RequestStatus.PREEMPTED
            assert victim.num_computed_tokens == 0
            assert kv.block_ids(rid) == []
        for o in sched.update(out, model(out) if out.chunks else []):
            streamed[o.request_id].extend(o.new_token_ids)
            if o.finished:
                finished.append(o.request_id)
        kv.check_integrity()
        steps += 1
        assert steps <= bound, "scheduler made no progress"
    assert sorted(finished) == sorted(reqs)  # each reported finished exactly once
    assert kv.num_free_blocks == kv.num_usable_blocks
    assert sum(r.num_preemptions for r in reqs.values()) == sched.num_preemptions
    for rid, r in reqs.items():
        assert r.finish_reason in ("stop", "length"), rid
        assert streamed[rid] == r.output_token_ids, rid
    return {rid: r.output_token_ids for rid, r in reqs.items()}, sched.num_preemptions, model


# (enable_chunked_prefill, max_num_batched_tokens, max_prefill_chunk)
_BUDGETS = [
    pytest.param(True, 16, 0, id="chunked-16"),
    pytest.param(True, 64, 8, id="chunked-64-cap8"),
    pytest.param(True, 512, 0, id="chunked-512"),
    pytest.param(False, 128, 0, id="whole-prompts-128"),
]


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix", "noprefix"])
@pytest.mark.parametrize(("chunked", "budget", "cap"), _BUDGETS)
def test_preemption_outputs_equal_unconstrained_and_reference(
    policy, prefix_caching, chunked, budget, cap
):
    specs = _workload()
    largest = max(-(-(len(p) + m) // BLOCK_SIZE) for _, p, m, _, _ in specs)
    small_pool = largest * 3 // 2 + 1  # +1: the null block
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget,
        max_model_len=128,
        enable_chunked_prefill=chunked,
        max_prefill_chunk=cap,
        policy=policy,
    )
    small, num_preempt, model = _run(specs, cfg, small_pool, prefix_caching)
    big, big_preempt, _ = _run(specs, cfg, NUM_REQUESTS * (largest + 1) + 1, prefix_caching)
    assert big_preempt == 0
    assert num_preempt >= 10
    assert small == big
    for rid, prompt, max_tokens, _, eos in specs:
        assert small[rid] == reference_output(model, prompt, max_tokens, eos), rid


def _four_decoders(policy: str, prefix_caching: bool = True):
    """Four 4-token prompts (one full block each) in a pool of 6 usable blocks: after the
    prefill step all four hold one block; in the first decode step each needs a second block
    and only two are free, so exactly one request is preempted."""
    kv = KVCacheManager(7, BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    model = FakeModel(7, BLOCK_SIZE)
    sched = Scheduler(SchedulerConfig(policy=policy), kv)
    prios = {"A": 0, "B": 2, "C": 2, "D": 1}
    reqs = {}
    for i, rid in enumerate("ABCD"):
        prompt = [10 * i + j for j in range(4)]
        reqs[rid] = Request(rid, prompt, max_tokens=3, priority=prios[rid])
        sched.add_request(reqs[rid])
    return sched, kv, model, reqs


def _spans(out):
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


@pytest.mark.parametrize(
    ("policy", "order", "victim"),
    [
        # priority: running order A(0) D(1) B(2) C(2); C has the largest priority value and
        # arrived after B.
        ("priority", "ADBC", "C"),
        # fcfs: running order A B C D; D arrived last.
        ("fcfs", "ABCD", "D"),
    ],
)
def test_victim_is_lowest_priority_latest_arrival(policy, order, victim):
    sched, kv, model, reqs = _four_decoders(policy)
    out = sched.schedule()
    assert _spans(out) == [(rid, 0, 4) for rid in order]
    sched.update(out, model(out))
    assert kv.num_free_blocks == 2

    out = sched.schedule()
    assert out.preempted_ids == [victim]
    assert sched.num_preemptions == 1
    survivors = [rid for rid in order if rid != victim]
    assert _spans(out) == [(rid, 4, 1) for rid in survivors]
    v = reqs[victim]
    assert v.status == RequestStatus.PREEMPTED
    assert v.num_preemptions == 1
    assert v.num_computed_tokens == 0
    assert kv.block_ids(victim) == []
    assert v in sched.waiting.items and v not in sched.running.items
    assert kv.num_free_blocks == 0
    sched.update(out, model(out))
    kv.check_integrity()

    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, model(out) if out.chunks else [])
        kv.check_integrity()
    assert reqs["A"].num_preemptions == 0
    for r in reqs.values():
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == reference_output(model, r.prompt_token_ids, 3)
    assert kv.num_free_blocks == kv.num_usable_blocks


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["noprefix", "prefix"])
def test_requester_preempts_itself_when_it_is_the_tail(prefix_caching):
    # Two requests, 4 usable blocks: A's prompt fills 2 blocks, B's 1. In the first decode
    # step A needs a third block (gets the last free one) and B, the tail, needs one too: B is
    # both requester and victim, so it is preempted and not scheduled.
    kv = KVCacheManager(5, BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    model = FakeModel(5, BLOCK_SIZE)
    sched = Scheduler(SchedulerConfig(), kv)
    a = Request("A", list(range(8)), max_tokens=2)
    b = Request("B", list(range(50, 54)), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert _spans(out) == [("A", 0, 8), ("B", 0, 4)]
    sched.update(out, model(out))
    out = sched.schedule()
    assert out.preempted_ids == ["B"]
    assert _spans(out) == [("A", 8, 1)]
    assert b.status == RequestStatus.PREEMPTED
    sched.update(out, model(out))
    assert a.status == RequestStatus.FINISHED_LENGTH
    out = sched.schedule()
    # B has 5 tokens (4 prompt + 1 output) to recompute. With prefix caching its full prompt
    # block is still cached (nothing was allocated since it was freed): only 1 token is left.
    assert _spans(out) == ([("B", 4, 1)] if prefix_caching else [("B", 0, 5)])
    assert b.num_cached_tokens == (4 if prefix_caching else 0)
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    sched.update(out, model(out))
    assert b.output_token_ids == reference_output(model, b.prompt_token_ids, 2)
    assert a.output_token_ids == reference_output(model, a.prompt_token_ids, 2)
    kv.check_integrity()
    assert kv.num_free_blocks == 4
