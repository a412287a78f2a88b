"""Liveness under random workloads: every request ends within a bounded number of steps, the
KV pool stays consistent after every step and is whole again at the end, and every request's
output is the reference output (or, when aborted, a prefix of it)."""

from __future__ import annotations

import random

import pytest
from fake_model import FakeModel, reference_output

from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.types import Request, RequestStatus

SEEDS_PER_CASE = 30
NUM_CASES = 20
ENDED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_REJECTED,
    RequestStatus.FINISHED_ABORTED,
}


def _random_workload(rng: random.Random):
    block_size = rng.choice([1, 4, 16])
    shared = [rng.randrange(97) for _ in range(64)]
    specs = []
    for i in range(rng.randint(1, 24)):
        plen = rng.randint(1, 60)
        if rng.random() < 0.5:  # prefix sharing, down to identical prompts
            k = rng.randint(0, plen)
            prompt = shared[:k] + [rng.randrange(97) for _ in range(plen - k)]
        else:
            prompt = [rng.randrange(97) for _ in range(plen)]
        kwargs = {
            "max_tokens": rng.randint(1, 40),
            "priority": rng.randint(0, 3),
            "eos_token_id": rng.choice([None, None, 5, 11]),
            "ignore_eos": rng.random() < 0.1,
            "stop_token_ids": frozenset(rng.sample(range(97), rng.choice([0, 0, 1, 2]))),
        }
        specs.append((f"r{i}", prompt, kwargs))
    largest = max(len(p) + kw["max_tokens"] for _, p, kw in specs)
    # From a pool too small for some prompts (rejections) to a roomy one.
    factor = rng.choice([0.3, 0.8, 1.0, 1.5, 3.0, 10.0])
    num_blocks = max(2, int(-(-largest // block_size) * factor)) + 1
    chunked = rng.random() < 0.8
    max_model_len = rng.choice([32, 64, 128, 4096])
    if chunked:
        budget = rng.choice([1, 3, 8, 32, 256])
        cap = rng.choice([0, 0, 2, 7])
    else:
        budget, cap = rng.choice([max_model_len, 4096]), 0
    cfg = SchedulerConfig(
        max_num_seqs=rng.choice([1, 2, 4, 256]),
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
        max_prefill_chunk=cap,
        policy=rng.choice(["fcfs", "priority"]),
    )
    kv = KVCacheManager(
        num_blocks,
        block_size,
        enable_prefix_caching=rng.random() < 0.7,
        hash_algo=rng.choice(["sha256", "fast"]),
    )
    return specs, cfg, kv


def _expected(model, prompt, kw, max_seq_len):
    n = max(0, min(kw["max_tokens"], max_seq_len - len(prompt)))
    stops = set(kw["stop_token_ids"])
    if kw["eos_token_id"] is not None and not kw["ignore_eos"]:
        stops.add(kw["eos_token_id"])
    out = reference_output(model, prompt, n)
    for i, t in enumerate(out):
        if t in stops:
            return out[: i + 1], "stop"
    return out, "length"


def _run_workload(seed: int) -> None:
    rng = random.Random(seed)
    specs, cfg, kv = _random_workload(rng)
    model = FakeModel(kv.num_blocks, kv.block_size)
    sched = Scheduler(cfg, kv)
    pending = list(specs)
    reqs: dict[str, Request] = {}
    streamed: dict[str, list[int]] = {}
    reported: dict[str, int] = {}
    arrival_steps = 0
    # Every step computes at least one token of some request; preemption recomputes are
    # bounded in practice by a small multiple of the total work (observed < 1x).
    bound = 4 * sum(len(p) + kw["max_tokens"] for _, p, kw in specs) + 10
    steps = 0
    while pending or sched.has_unfinished():
        if pending:
            arrival_steps += 1
            for _ in range(rng.randint(0, 3)):
                if pending:
                    rid, prompt, kw = pending.pop(0)
                    reqs[rid] = Request(rid, prompt, **kw)
                    admitted = sched.add_request(reqs[rid])
                    assert admitted == (len(prompt) + 1 <= sched.max_seq_len)
        if reqs and rng.random() < 0.04:
            sched.abort(rng.choice(list(reqs)))
        out = sched.schedule()
        assert len(out.chunks) <= cfg.max_num_seqs
        assert out.num_batched_tokens <= cfg.max_num_batched_tokens
        if reqs and rng.random() < 0.03:
            sched.abort(rng.choice(list(reqs)))  # between schedule and the model
        toks = model(out) if out.chunks else []
        if reqs and rng.random() < 0.03:
            sched.abort(rng.choice(list(reqs)))  # between the model and update
        for o in sched.update(out, toks):
            assert reported.get(o.request_id, 0) == 0, f"{o.request_id} reported after its end"
            streamed.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                reported[o.request_id] = 1
        kv.check_integrity()
        steps += 1
        assert steps <= bound + arrival_steps, f"seed {seed}: no end after {steps} steps"

    assert kv.num_free_blocks == kv.num_usable_blocks
    assert not kv.owned_blocks()
    assert not sched.running and not sched.waiting
    for rid, prompt, kw in specs:
        r = reqs[rid]
        assert r.status in ENDED, (seed, rid, r.status)
        assert reported.get(rid) == 1, (seed, rid)
        assert streamed.get(rid, []) == r.output_token_ids, (seed, rid)
        want, reason = _expected(model, prompt, kw, sched.max_seq_len)
        if r.status == RequestStatus.FINISHED_REJECTED:
            assert len(prompt) + 1 > sched.max_seq_len, (seed, rid)
            assert r.output_token_ids == []
        elif r.status == RequestStatus.FINISHED_ABORTED:
            assert r.output_token_ids == want[: r.num_output_tokens], (seed, rid)
        else:
            assert (r.output_token_ids, r.finish_reason) == (want, reason), (seed, rid)


@pytest.mark.parametrize("case", range(NUM_CASES))
def test_random_workloads_end_and_keep_the_pool_whole(case):
    for seed in range(case * SEEDS_PER_CASE, (case + 1) * SEEDS_PER_CASE):
        _run_workload(seed)


def test_tiny_pool_serializes_but_finishes():
    """One usable block more than the longest request needs: requests run nearly one at a
    time, with constant preemption, and still all finish with the reference output."""
    bs = 4
    rng = random.Random(7)
    specs = [(f"t{i}", [rng.randrange(97) for _ in range(rng.randint(1, 12))]) for i in range(12)]
    num_blocks = -(-(12 + 8) // bs) + 1 + 1
    kv = KVCacheManager(num_blocks, bs)
    model = FakeModel(num_blocks, bs)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=5), kv)
    made = {}
    for rid, prompt in specs:
        made[rid] = Request(rid, prompt, max_tokens=8)
        sched.add_request(made[rid])
    steps = 0
    while sched.has_unfinished():
        sched.step(model)
        kv.check_integrity()
        steps += 1
        assert steps <= 4 * 12 * 20
    assert sched.num_preemptions > 0
    assert kv.num_free_blocks == kv.num_usable_blocks
    for rid, prompt in specs:
        assert made[rid].output_token_ids == reference_output(model, prompt, 8)
