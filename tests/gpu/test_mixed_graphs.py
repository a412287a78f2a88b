"""Piecewise CUDA graphs for prefill and mixed steps (GPU only): every bucket's replay is
bitwise equal to the same padded forward run eagerly (same kernels, same attention), replays
are deterministic, and an engine with the graphs generates the tokens of an eager engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.runner._input_batch import prepare_batch  # noqa: E402
from layerzero_serve.runner.piecewise_graphs import PiecewiseGraphRunner  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402
from layerzero_serve.types import SchedulerOutput  # noqa: E402

MODEL = "dummy:small-d128"


@pytest.fixture(scope="module")
def engine():
    return Engine(model=MODEL, dtype="bfloat16", max_num_seqs=32, max_model_len=1024,
                  num_kv_blocks=2048, max_num_batched_tokens=512)  # fmt: skip


def _step(rng, kv, lens_q, lens_ctx):
    """A mixed step: row i has lens_ctx[i] cached tokens and lens_q[i] new ones, on disjoint
    random blocks."""
    bs = kv.spec.block_size
    free = list(rng.permutation(np.arange(1, kv.num_blocks)))
    reqs, blocks = [], []
    for q, c in zip(lens_q, lens_ctx, strict=True):
        n = q + c
        ids = rng.integers(0, 2048, size=n).tolist()
        reqs.append(type("R", (), {"all_token_ids": ids, "request_id": str(len(reqs))})())
        blocks.append([int(free.pop()) for _ in range(-(-n // bs))])
    return SchedulerOutput(step_id=0, requests=reqs, starts=list(lens_ctx),
                           num_scheduled=list(lens_q), block_ids=blocks,
                           num_batched_tokens=sum(lens_q), blocks_to_copy=[],
                           preempted_ids=[])  # fmt: skip


def test_every_bucket_replays_the_eager_padded_forward(engine):
    runner = engine.runner
    mixed = runner.mixed_graphs
    assert mixed is not None and sorted(mixed.graphs) == mixed.buckets
    s = runner._shape
    dtype = next(runner.model.parameters()).dtype
    eager = PiecewiseGraphRunner(runner.model, s.num_q_heads, s.num_kv_heads, s.head_dim, dtype,
                                 mixed.buckets, runner.device, capture=False)  # fmt: skip
    rng = np.random.default_rng(0)
    kv = runner.kv_cache
    for size in mixed.buckets:
        t = max(1, size - 5)
        q = [t // 3, t - 1 - t // 3, 1]  # two prefill chunks and a decode row
        out = _step(rng, kv, q, [0, 40, 200])
        batch = prepare_batch(out, kv.spec.block_size, runner.device)
        runner.attn.begin_step(batch.meta)
        got = mixed.run(batch.input_ids, batch.positions, runner.attn, batch.meta).clone()
        again = mixed.run(batch.input_ids, batch.positions, runner.attn, batch.meta).clone()
        ref = eager.run(batch.input_ids, batch.positions, runner.attn, batch.meta)
        assert got.shape == (t, runner.model.config.hidden_size)
        assert torch.equal(got, again), f"bucket {size}: replay is not deterministic"
        err = (got.float() - ref.float()).abs().max().item()
        assert torch.equal(got, ref), f"bucket {size}, {t} tokens: max |replay - eager| {err}"


def _generate(eng):
    g = torch.Generator().manual_seed(0)
    rids = []
    for n in (700, 90, 300, 5, 1000, 45):  # chunks of 512 tokens next to decode rows
        prompt = torch.randint(0, 2048, (n,), generator=g).tolist()
        rids.append(eng.add_request(prompt, SamplingParams(max_tokens=24, temperature=0.0)))
    toks: dict[str, list[int]] = {r: [] for r in rids}
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id].extend(o.new_token_ids)
    return [toks[r] for r in rids]


def test_engine_with_mixed_graphs_generates_the_tokens_of_the_same_steps_run_eagerly():
    """Against an engine whose mixed steps take the same padded path without graphs (the
    runner's eager mode, same buckets): the same kernels at the same sizes, so the tokens must
    be identical. (Against ``enforce_eager`` the prefill GEMMs run at unpadded sizes, which
    may round differently and flip near ties of a random model.)"""
    kw = dict(model=MODEL, dtype="float32", max_num_seqs=8, max_model_len=2048,
              num_kv_blocks=1024, max_num_batched_tokens=512)  # fmt: skip
    eng = Engine(**kw)
    assert eng.runner.mixed_graphs is not None and eng.runner.mixed_graphs.capture
    calls = []
    run = eng.runner.mixed_graphs.run
    eng.runner.mixed_graphs.run = lambda ids, *a: calls.append(ids.shape[0]) or run(ids, *a)
    got = _generate(eng)
    ref_engine = Engine(**kw)
    ref_engine.runner.enable_mixed_graphs(512, capture=False, progress=False)
    ref = _generate(ref_engine)
    assert calls and max(calls) == 512, calls
    assert got == ref
