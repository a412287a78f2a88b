"""The FlashInfer rejection-sampling adapter (kernels/_flashinfer_rejection.py) on the CPU.

FlashInfer's ``chain_speculative_sampling`` needs CUDA; here a stand-in with its signature and
its law (plain rejection sampling of an equal-length chain, the torch reference with every row
drafting k tokens, its own random stream) checks the part that is ours: the mapping of per-row
draft counts, out-of-vocabulary ids, one-hot drafts, greedy rows and garbage padding onto one
chain. The stand-in asserts that what it is given is a valid chain (ids in range, finite
distributions that sum to 1), so garbage never reaches FlashInfer. The lossless checks are the
ones of test_spec_lossless.py; the GPU suite runs them on the real kernel with 10^6 trials.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_spec_lossless import (  # noqa: E402
    ALPHA,
    JOINT_SEQS,
    joint_draws,
    joint_pvalue,
    single_position_failures,
)

from layerzero_serve.kernels._catalog import all_specs  # noqa: E402
from layerzero_serve.kernels._flashinfer_rejection import (  # noqa: E402
    chain_inputs,
    chain_rejection_sample,
)
from layerzero_serve.kernels.spec import KernelContext, Op, Reason  # noqa: E402
from layerzero_serve.spec_decode._rejection import draw_randoms, rejection_sample  # noqa: E402


def stand_in_chain(draft_probs, draft_token_ids, target_probs, accepted, emitted, **kw):
    """FlashInfer's chain law on the CPU: every row verifies all k drafts."""
    b, k = draft_token_ids.shape
    v = target_probs.shape[2]
    assert draft_token_ids.dtype == torch.int32
    assert bool(((draft_token_ids >= 0) & (draft_token_ids < v)).all())
    for dist in (draft_probs, target_probs):
        assert bool(torch.isfinite(dist).all()) and bool((dist >= 0).all())
        assert torch.allclose(dist.sum(-1), torch.ones(()), atol=1e-4)
    gen = torch.Generator().manual_seed(int(kw["seed"][0]) & 0x7FFFFFFF)
    u, noise = draw_randoms(b, k, v, generator=gen)
    full = torch.full((b,), k, dtype=torch.int32)
    out, acc = rejection_sample(draft_token_ids.long(), draft_probs, target_probs, u, noise, full)
    emitted += acc
    return out.to(torch.int32), accepted, emitted


def adapter(*args):
    return chain_rejection_sample(stand_in_chain, *args)


def test_single_position_is_lossless():
    assert single_position_failures(adapter) == []


@pytest.mark.parametrize("greedy_draft", [False, True])
def test_joint_law_with_varying_draft_counts_and_garbage_padding(greedy_draft):
    emitted = joint_draws(adapter, JOINT_SEQS, greedy_draft=greedy_draft)
    assert (emitted >= 0).all()
    assert joint_pvalue(emitted) > ALPHA


def _batch(b=48, k=4, v=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(b, k + 1, v, generator=gen) ** 6
    target /= target.sum(-1, keepdim=True)
    draft = (0.5 * target[:, :k] + 0.5 / v).contiguous()
    ids = torch.multinomial(draft.reshape(-1, v), 1, generator=gen).reshape(b, k)
    num_drafts = torch.randint(0, k + 1, (b,), generator=gen).int()
    pad = torch.arange(k) >= num_drafts[:, None].long()
    draft[pad] = float("nan")  # garbage past each row's drafts
    target[torch.cat([torch.zeros(b, 1, dtype=torch.bool), pad], 1)] = float("inf")
    if k >= 2:
        ids[0, 1], ids[1, 0] = v, -5  # out of vocabulary
        num_drafts[:2] = k
    greedy = torch.rand(b, generator=gen) < 0.4
    u, noise = draw_randoms(b, k, v, generator=gen)
    return ids, draft, target, u, noise, num_drafts, greedy


def test_chain_inputs_end_rows_at_their_drafts_or_first_bad_id():
    ids, draft, target, _, _, nd, greedy = _batch()
    ids32, q, p, n = chain_inputs(ids, draft, target, nd, greedy)
    expect = nd.long().clone()
    expect[0], expect[1] = 1, 0  # first out-of-vocabulary position
    assert torch.equal(n, expect)
    for r in range(ids.shape[0]):
        m = int(n[r])
        assert torch.equal(ids32[r, :m].long(), ids[r, :m]) and bool((ids32[r, m:] == 0).all())
        if greedy[r]:
            assert torch.equal(q[r], torch.nn.functional.one_hot(ids32[r].long(), 64).float())
            assert torch.equal(p[r].argmax(-1), target[r].argmax(-1))
            assert bool((p[r].amax(-1) == 1).all())
        else:
            assert torch.equal(q[r, :m], draft[r, :m]) and torch.equal(
                p[r, : m + 1], target[r, : m + 1]
            )


def test_greedy_rows_equal_the_reference_exactly():
    ids, draft, target, u, noise, nd, greedy = _batch(seed=3)
    ids = torch.where(torch.rand(ids.shape) < 0.5, target[:, :-1].argmax(-1), ids)  # hits
    ids[0, 1], ids[1, 0] = 64, -5
    for q in (draft, None):
        ref_out, ref_acc = rejection_sample(ids, q, target, u, noise, nd, greedy)
        out, acc = adapter(ids, q, target, u, noise, nd, greedy)
        assert torch.equal(out[greedy], ref_out[greedy]) and torch.equal(
            acc[greedy], ref_acc[greedy]
        )
        # every row: the accepted prefix is the row's own drafts, one token follows, -1 after
        for r in range(ids.shape[0]):
            a = int(acc[r])
            assert a <= int(nd[r]) and torch.equal(out[r, :a], ids[r, :a])
            assert 0 <= int(out[r, a]) < 64 and bool((out[r, a + 1 :] == -1).all())


def test_deterministic_in_its_inputs_and_k0_falls_back():
    args = _batch(seed=5)
    a, b = adapter(*args), adapter(*args)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ids, _, target, u, noise, nd, greedy = _batch(k=0, seed=6)
    out, acc = adapter(ids, None, target, u, noise, nd, greedy)
    ref = rejection_sample(ids, None, target, u, noise, nd, greedy)
    assert torch.equal(out, ref[0]) and torch.equal(acc, ref[1])


def test_catalog_entry_is_cuda_only_and_below_triton():
    spec = next(s for s in all_specs() if s.name == "flashinfer.rejection_sampling")
    triton = next(s for s in all_specs() if s.name == "triton.rejection_sampling")
    assert spec.op is Op.REJECTION_SAMPLING and spec.graph_safe
    assert spec.priority < triton.priority
    cpu = KernelContext(op=Op.REJECTION_SAMPLING, device_type="cpu")
    assert spec.supports(cpu).code is Reason.DEVICE_TYPE
