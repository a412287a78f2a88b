"""Speculative decoding on the GPU: verification captured per (bucket, k + 1) replays bitwise
equal to an eager run of the same padded batch, and greedy output with speculation (graphs and
eager) is token-identical to plain decoding in fp32 (bf16: match rate reported)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402

MODEL = "dummy:small-d128"
GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)


def _prompts():
    rng = np.random.default_rng(5)
    motif = rng.integers(0, 2000, size=8).tolist()
    return [motif * 5, rng.integers(0, 2000, size=70).tolist(), [17] * 30, motif[:4] * 9, [1, 2]]


def _run(dtype, **kw):
    eng = Engine(
        model=MODEL, dtype=dtype, max_num_seqs=16, max_model_len=512, num_kv_blocks=1024, **kw
    )
    ids = [eng.add_request(p, GREEDY) for p in _prompts()]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    return [got[i] for i in ids], eng


SPEC = dict(speculative_method="ngram", adaptive_speculation=False)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_fp32_greedy_identical_with_speculation_in_graphs_and_eager(k):
    ref, _ = _run("float32")
    graphs, eng = _run("float32", num_speculative_tokens=k, **SPEC)
    assert eng.runner.verify_graphs is not None
    assert graphs == ref
    eager, _ = _run("float32", num_speculative_tokens=k, enforce_eager=True, **SPEC)
    assert eager == ref
    assert eng.stats()["speculative"]["accepted_tokens"] > 0


def test_bf16_speculative_match_rate_reported():
    ref, _ = _run("bfloat16")
    got, eng = _run("bfloat16", num_speculative_tokens=4, **SPEC)
    same = total = 0
    for a, b in zip(got, ref, strict=True):
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        total += len(a)
    print(json.dumps({"bf16_spec_prefix_match_rate": same / total, **eng.stats()["speculative"]}))
    assert same / total > 0.3


def test_verify_replay_equals_eager_for_every_bucket():
    _, eng = _run("bfloat16", num_speculative_tokens=4, **SPEC)
    g = eng.runner.verify_graphs
    kv = eng.runner.kv_cache
    bs, q = kv.spec.block_size, g.q_len
    rng = np.random.default_rng(0)
    for batch in g.buckets:
        n = batch if batch < 3 else batch - 1  # a padding row when possible
        lens = rng.integers(q + 1, 400, size=n)
        free = rng.permutation(np.arange(1, kv.num_blocks))
        table = np.zeros((n, g.width), np.int32)
        used = 0
        for i, L in enumerate(lens):
            nb = -(-int(L) // bs)
            table[i, :nb] = free[used : used + nb]
            used += nb
        pos = (lens - q)[:, None] + np.arange(q)[None, :]
        slots = table[np.arange(n)[:, None], pos // bs].astype(np.int64) * bs + pos % bs
        slots[:, -1] = -1  # a padding token at the end of every row
        ids = rng.integers(0, 2000, size=(n, q))
        got = g.run(ids.ravel(), pos.ravel(), slots.ravel(), lens, table).clone()
        cap = g.graphs[batch]
        step_lens = [int(x) for x in lens] + [q] * (batch - n)
        meta = g._meta(batch, step_lens, max(step_lens))
        cap.dispatch.begin_step(meta)
        with torch.inference_mode():
            hidden = g.model(g.input_ids[: batch * q], g.positions[: batch * q], cap.dispatch, meta)
            ref = g.model.compute_logits(hidden)[: n * q]
        assert torch.equal(got, ref), f"bucket {batch}: {(got - ref).abs().max().item()}"


def test_draft_model_decode_replays_its_own_graphs():
    """A draft model (here the target's own preset: it proposes the target's tokens) captures
    its decode per bucket; greedy output with its drafts is the plain output, in graph mode."""
    ref, _ = _run("float32")
    got, eng = _run(
        "float32",
        speculative_method="draft_model",
        speculative_model=MODEL,
        num_speculative_tokens=4,
        adaptive_speculation=False,
    )
    draft = eng.spec.proposer.runner
    assert draft.graphs is not None and max(draft.graphs.buckets) <= 64
    assert got == ref
    s = eng.stats()["speculative"]
    assert s["drafted_tokens"] > 0 and s["accepted_tokens"] > 0.9 * s["drafted_tokens"]
