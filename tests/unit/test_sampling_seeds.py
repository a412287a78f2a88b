"""Seeded reproducibility: a seeded request's tokens do not depend on its batch position or its
batch mates (20 repetitions, batches of 1 to 64 rows with every kind of filler: greedy, seeded,
unseeded, filtered, penalised, biased, with logprobs); unseeded rows draw fresh numbers every
step and on every repeated ``sample()`` of one batch (what a replayed graph does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.sampling._rows import CallRow

V = 48
STEPS = 20
REPETITIONS = 20

TRACKED = [
    SamplingParams(seed=101),
    SamplingParams(seed=202, temperature=0.8, top_p=0.9),
    SamplingParams(seed=303, top_k=8),
    SamplingParams(seed=404, min_p=0.05, temperature=1.3),
    SamplingParams(seed=505, temperature=1.1, top_k=16, top_p=0.95, min_p=0.02),
    SamplingParams(seed=101, temperature=0.9),  # same seed as #0, other params
    SamplingParams(seed=606, temperature=0.0),  # greedy, seeded
    SamplingParams(seed=707, repetition_penalty=1.4, frequency_penalty=0.3, logprobs=2),
    SamplingParams(seed=808, logit_bias={3: 2.0}, bad_token_ids=[4], min_tokens=3, top_k=20),
]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: on a 2-core VM torch's thread wake-ups cost more than they save."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _step_logits(req: int, step: int, prev: int) -> np.ndarray:
    """Deterministic 'model': logits depend on the request, the step and the previous token."""
    return np.random.default_rng([req, step, prev + 1]).normal(0.0, 1.5, V).astype(np.float32)


def _tracked_rows(tag: str) -> list[CallRow]:
    return [CallRow(f"{tag}{i}", p, [1, 2, 3 + i], [1, 2, 3 + i], eos_token_id=0) for i, p in
            enumerate(TRACKED)]  # fmt: skip


def _solo() -> list[list[int]]:
    sampler = Sampler().bind("cpu", V)
    rows = _tracked_rows("solo")
    for step in range(STEPS):
        for i, r in enumerate(rows):
            logits = torch.from_numpy(_step_logits(i, step, r.all_token_ids[-1]))[None]
            tok = sampler.sample(logits, sampler.prepare([r])).tokens
            r.all_token_ids.append(int(tok[0]))
    return [r.all_token_ids[3:] for r in rows]


def _filler(rng: np.random.Generator, key: str) -> tuple[np.ndarray, CallRow]:
    kind = int(rng.integers(5))
    logits = rng.normal(0.0, rng.uniform(0.5, 3.0), V).astype(np.float32)
    kw: dict = {}
    if kind == 0:
        kw = {"temperature": 0.0}
    elif kind in (1, 2):
        kw = {
            "temperature": float(rng.uniform(0.3, 2.0)),
            "top_k": int(rng.choice([0, -1, 1, 3, 40, 1000])),
            "top_p": float(rng.choice([1.0, 0.5, 0.9])),
            "min_p": float(rng.choice([0.0, 0.1])),
        }
    elif kind == 3:
        kw = {"repetition_penalty": 1.3, "logit_bias": {5: 1.0}, "min_tokens": 2, "logprobs": 3}
    else:
        kw = {"allowed_token_ids": [1, 5, 9, 30], "logprobs": 1, "logprobs_mode": "processed"}
    if rng.random() < 0.4:
        kw["seed"] = int(rng.integers(-(2**62), 2**62))
    prompt = rng.integers(0, V, 4).tolist()
    out = rng.integers(0, V, int(rng.integers(0, 5))).tolist()
    return logits, CallRow(key, SamplingParams(**kw), prompt, prompt + out, eos_token_id=0)


def test_seeded_requests_independent_of_batch_position_and_mates():
    solo = _solo()
    rng = np.random.default_rng(2025)
    sizes = set()
    for rep in range(REPETITIONS):
        sampler = Sampler(seed=int(rng.integers(1 << 30)), max_num_seqs=64).bind("cpu", V)
        rows = _tracked_rows(f"t{rep}-")
        for step in range(STEPS):
            order = rng.permutation(len(rows))
            cuts = sorted(rng.choice(np.arange(1, len(rows)), rng.integers(0, 4), replace=False))
            for g, group in enumerate(np.split(order, cuts)):
                size = int(rng.integers(len(group), 65)) if rng.random() < 0.8 else len(group)
                batch = [(int(i), None) for i in group]
                batch += [
                    (-1, _filler(rng, f"f{rep}-{step}-{g}-{j}")) for j in range(size - len(group))
                ]
                batch = [batch[i] for i in rng.permutation(len(batch))]
                sizes.add(len(batch))
                logits = np.stack(
                    [
                        _step_logits(i, step, rows[i].all_token_ids[-1]) if i >= 0 else f[0]
                        for i, f in batch
                    ]  # fmt: skip
                )
                call = [rows[i] if i >= 0 else f[1] for i, f in batch]
                toks = sampler.sample(torch.from_numpy(logits), sampler.prepare(call)).tokens
                for (i, f), tok in zip(batch, toks.tolist(), strict=True):
                    if i >= 0:
                        rows[i].all_token_ids.append(tok)
                    else:
                        sampler.release(f[1].request_id)
        assert [r.all_token_ids[3:] for r in rows] == solo, f"repetition {rep}"
    assert 1 in sizes and max(sizes) > 48


def test_unseeded_draws_change_every_step_and_every_replay():
    logits = torch.zeros(4, V)  # uniform: any repeat would be a coincidence
    sampler = Sampler(seed=0).bind("cpu", V)
    rows = [CallRow(i, SamplingParams(), [1], [1]) for i in range(4)]
    per_step = []
    for _ in range(6):
        toks = sampler.sample(logits, sampler.prepare(rows)).tokens
        per_step.append(toks.tolist())
        for r, t in zip(rows, toks.tolist(), strict=True):
            r.all_token_ids.append(t)
    assert len({tuple(s) for s in per_step}) > 1
    batch = sampler.prepare(rows)  # same inputs, sample() replayed: fresh numbers each time
    replays = {tuple(sampler.sample(logits, batch).tokens.tolist()) for _ in range(6)}
    assert len(replays) > 1
    # seeded rows replayed without prepare() move on too (offset advanced on the device)
    seeded = [CallRow("s", SamplingParams(seed=1), [1], [1])]
    b = sampler.prepare(seeded)
    assert len({int(sampler.sample(torch.zeros(1, V), b).tokens[0]) for _ in range(8)}) > 1


def test_unseeded_rows_follow_the_sampler_seed():
    logits = torch.zeros(50, V)
    params = [SamplingParams()] * 50
    a = Sampler(seed=3)(logits, params).tokens
    b = Sampler(seed=3)(logits, params).tokens
    c = Sampler(seed=4)(logits, params).tokens
    assert a == b and a != c


def test_same_seed_same_tokens_within_a_batch_different_seeds_differ():
    logits = torch.zeros(6, V)
    seeds = [7, 8, 7, 9, 8, 7]
    sampler = Sampler(seed=0)
    seqs = np.array(
        [
            sampler(logits, SamplingParams(), seeds=seeds, output_token_ids=[[0] * s] * 6).tokens
            for s in range(STEPS)
        ]  # fmt: skip
    ).T
    assert (seqs[0] == seqs[2]).all() and (seqs[0] == seqs[5]).all() and (seqs[1] == seqs[4]).all()
    assert not (seqs[0] == seqs[1]).all() and not (seqs[0] == seqs[3]).all()


def test_padding_and_a_wider_plan_change_no_token():
    """What a captured graph runs (the batch padded to its bucket, every stage of a wider plan)
    gives the rows the tokens and logprobs the minimal eager plan gives them."""
    from layerzero_serve.sampling import SamplingPlan

    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(0, 2, (8, V)).astype(np.float32))
    params = [
        SamplingParams(seed=1, logprobs=2),
        SamplingParams(temperature=0.0),
        SamplingParams(seed=3, temperature=0.7, min_p=0.05),
    ]
    rows = [CallRow(i, p, [1, 2], [1, 2, 5]) for i, p in enumerate(params)]
    minimal = Sampler(seed=0).bind("cpu", V)
    ref = minimal.sample(logits[:3], minimal.prepare(rows)).to_host()
    full = SamplingPlan(
        all_greedy=False,
        any_greedy=True,
        filters=True,
        penalties=True,
        token_mask=True,
        min_tokens=True,
        invariant=True,
        num_top_logprobs=4,
        raw_logprobs=True,
        processed_logprobs=True,
    )
    wide = Sampler(seed=0).bind("cpu", V)
    batch = wide.prepare(rows, plan_floor=full, pad_to=8)
    assert batch.num_rows == 8 and batch.plan == full
    got = wide.sample(logits, batch).to_host()
    assert got.tokens[:3] == ref.tokens and not got.failed
    assert got.logprobs[0].logprob == ref.logprobs[0].logprob
    assert got.logprobs[0].top_token_ids == ref.logprobs[0].top_token_ids[:2]
    assert got.logprobs[3:] == [None] * 5
