"""CUDA-graph decode (GPU only): replay is bitwise equal to eager execution of the same padded
batch for every bucket, stays equal over 100 replays with changing lengths and composition,
padding rows never touch the KV cache, and greedy tokens are identical with graphs on and off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402

MODEL = "dummy:small-d128"


@pytest.fixture(scope="module")
def engine():
    return Engine(
        model=MODEL, dtype="bfloat16", max_num_seqs=32, max_model_len=1024, num_kv_blocks=2048
    )


def _random_batch(rng, n, kv, width, bs, max_len=600):
    """n sequences with random lengths and disjoint random blocks."""
    lens = rng.integers(1, max_len, size=n)
    free = rng.permutation(np.arange(1, kv.num_blocks))
    table = np.zeros((n, width), np.int32)
    used = 0
    for i, L in enumerate(lens):
        nb = -(-int(L) // bs)
        table[i, :nb] = free[used : used + nb]
        used += nb
    starts = lens - 1
    slots = table[np.arange(n), starts // bs].astype(np.int64) * bs + starts % bs
    ids = rng.integers(0, 2048, size=n)
    return ids, starts, slots, lens, table


def _eager_same_padded_batch(g, batch, seq_lens):
    """The bucket's kernels run eagerly on the padded batch the last replay read (its static
    inputs), planned for the same step: the step's metadata, not the capture-time one."""
    cap = g.graphs[batch]
    lens = [int(x) for x in seq_lens] + [1] * (batch - len(seq_lens))
    meta = g._meta(batch, lens, max(lens))
    cap.dispatch.begin_step(meta)
    with torch.inference_mode():
        hidden = g.model(g.input_ids[:batch], g.positions[:batch], cap.dispatch, meta)
        return g.model.compute_logits(hidden)


def test_replay_equals_eager_for_every_bucket(engine):
    g = engine.runner.graphs
    assert g is not None and sorted(g.graphs) == g.buckets
    rng = np.random.default_rng(0)
    kv = engine.runner.kv_cache
    for batch in g.buckets:
        for n in {1, batch}:
            args = _random_batch(rng, n, kv, g.width, kv.spec.block_size)
            got = g.run(*args).clone()
            again = g.run(*args).clone()
            ref = _eager_same_padded_batch(g, batch, args[3])[:n]
            assert torch.equal(got, again), f"bucket {batch}: replay is not deterministic"
            err = (got - ref).abs().max().item()
            assert torch.equal(got, ref), f"bucket {batch}, n={n}: max |replay - eager| {err}"


def test_graph_decode_kernels_are_selected_per_bucket(engine):
    """The default graph decode is the Triton kernel (graph_priority: no host plan per step)."""
    g = engine.runner.graphs
    names = {cap.dispatch.decode.choice.name for cap in g.graphs.values()}
    assert names == {"triton.paged_decode"}, names
    assert {cap.dispatch.writer.choice.name for cap in g.graphs.values()} == {"triton.kv_write"}


def test_flashinfer_graph_decode_replay_equals_eager():
    """FlashInfer's decode locked for the graphs (plan per step on the host, fixed buffers per
    bucket): replay equals the eager run of the same padded batch under the same plan."""
    from layerzero_serve.kernels._backends import probe_backend
    from layerzero_serve.selection import configure

    if not probe_backend("flashinfer").available:
        pytest.skip("flashinfer unavailable")
    configure(lock={"attention_decode": "flashinfer.decode"})
    try:
        eng = Engine(
            model=MODEL, dtype="bfloat16", max_num_seqs=8, max_model_len=1024, num_kv_blocks=2048
        )
    finally:
        configure(reset=True)
    g = eng.runner.graphs
    assert {c.dispatch.decode.choice.name for c in g.graphs.values()} == {"flashinfer.decode"}
    kv = eng.runner.kv_cache
    rng = np.random.default_rng(0)
    for batch in g.buckets:
        for n in sorted({1, batch}):
            args = _random_batch(rng, n, kv, g.width, kv.spec.block_size)
            got = g.run(*args).clone()
            ref = _eager_same_padded_batch(g, batch, args[3])[:n]
            err = (got - ref).abs().max().item()
            assert torch.equal(got, ref), f"bucket {batch}, n={n}: max |replay - eager| {err}"


def test_hundred_replays_with_changing_batches(engine):
    g = engine.runner.graphs
    kv = engine.runner.kv_cache
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = int(rng.integers(1, g.max_batch + 1))
        args = _random_batch(rng, n, kv, g.width, kv.spec.block_size)
        got = g.run(*args).clone()
        ref = _eager_same_padded_batch(g, g.bucket_for(n), args[3])[:n]
        assert torch.equal(got, ref)


def test_padding_rows_never_change_the_kv_cache(engine):
    g = engine.runner.graphs
    kv = engine.runner.kv_cache
    rng = np.random.default_rng(2)
    n = 3  # padded to bucket 4
    ids, starts, slots, lens, table = _random_batch(rng, n, kv, g.width, kv.spec.block_size)
    before = [t.clone() for t in kv.tensors]
    g.run(ids, starts, slots, lens, table)
    torch.cuda.synchronize()
    bs = kv.spec.block_size
    written = {int(s) for s in slots}
    for b, a in zip(before, kv.tensors, strict=True):
        diff = (b != a).any(-1).any(-1).any(1)  # [num_blocks, block_size]
        rows, cols = torch.nonzero(diff, as_tuple=True)
        changed = {int(i) * bs + int(j) for i, j in zip(rows.tolist(), cols.tolist(), strict=True)}
        assert changed <= written
        assert torch.equal(b[0], a[0])  # the null block


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_greedy_identical_with_graphs_on_and_off(dtype):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 2048, size=int(n)).tolist() for n in (1, 7, 16, 33, 90, 5, 12)]
    outs = []
    for eager in (True, False):
        eng = Engine(
            model=MODEL,
            dtype=dtype,
            max_num_seqs=16,
            max_model_len=512,
            num_kv_blocks=512,
            enforce_eager=eager,
        )
        ids = [eng.add_request(p, params) for p in prompts]
        got = {i: [] for i in ids}
        while eng.has_unfinished():
            for o in eng.step():
                got[o.request_id].extend(o.new_token_ids)
        outs.append([got[i] for i in ids])
    assert outs[0] == outs[1]


def _generate(prompts, params, **kw):
    eng = Engine(model=MODEL, max_num_seqs=16, max_model_len=512, num_kv_blocks=512, **kw)
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    return [got[i] for i in ids], eng


def test_sampler_graphs_give_the_eager_tokens():
    """Sampling replayed from per-(bucket, plan) graphs: greedy and seeded sampled rows get
    exactly the eager tokens (seeded rows draw from their own (seed, offset) stream, so the
    bucket's padding rows cannot move them), and graphs were in fact captured."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 2048, size=int(n)).tolist() for n in (3, 9, 17, 40, 6, 11, 2)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(
            temperature=0.9, top_k=40, top_p=0.9, seed=100 + i, max_tokens=20, ignore_eos=True
        )
        for i in range(len(prompts))
    ]
    eager, _ = _generate(prompts, params, enforce_eager=True)
    graphed, eng = _generate(prompts, params, enforce_eager=False)
    assert graphed == eager
    assert len(eng.runner.sampler_graphs) >= 1
    greedy_only, eng = _generate(prompts[:3], [params[0]] * 3, enforce_eager=False)
    assert len(eng.runner.sampler_graphs) >= 1
    assert greedy_only == _generate(prompts[:3], [params[0]] * 3, enforce_eager=True)[0]
