"""Triton rejection sampling against the torch reference: bitwise-equal outputs on the same
random inputs, over draft counts (including out-of-range ones), vocabularies spanning several
tiles, implied (None) and explicit draft distributions, greedy and mixed rows, out-of-vocabulary
draft ids, argmax ties and all-zero residuals. Runs under the Triton interpreter on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from layerzero_serve.kernels._catalog import all_specs  # noqa: E402
from layerzero_serve.kernels._triton.rejection_sampling import (  # noqa: E402
    TritonRejectionSampler,
    triton_rejection_sample,
)
from layerzero_serve.kernels.spec import KernelContext, Op, Reason  # noqa: E402
from layerzero_serve.spec_decode._rejection import draw_randoms, rejection_sample  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(b, k, v, seed):
    """Inputs that exercise every branch: drafts mostly drawn from q (so prefixes get accepted),
    q = p rows (all-zero residual after a forced rejection), one-hot and tied targets, greedy
    drafts equal to the target's argmax, out-of-vocabulary ids and NaN padding distributions."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, k + 1, v, generator=g)
    target[torch.rand(b, k + 1, v, generator=g) < 0.3] = 0.0
    target[..., 0] += 1e-3  # no all-zero row
    target /= target.sum(-1, keepdim=True)
    if b > 2 and v > 3:
        target[1] = 0.0
        target[1, :, 2] = 1.0  # one-hot target
        target[2] = 0.0
        target[2, :, 1], target[2, :, v - 1] = 0.5, 0.5  # tie: argmax is the lower id
    draft = torch.rand(b, k, v, generator=g) ** 3
    draft /= draft.sum(-1, keepdim=True)
    draft[0::3] = target[0::3, :k]  # q = p
    ids = torch.zeros(b, k, dtype=torch.long)
    if k:
        ids = torch.multinomial(draft.reshape(-1, v), 1, generator=g).reshape(b, k)
        ids[3::4] = target[3::4, :k].argmax(-1)  # what greedy rows accept
        if b > 2 and v > 3:
            ids[1] = 2  # sure accept against the one-hot target, whatever q
        bad = torch.rand(b, k, generator=g) < 0.15
        junk = torch.tensor([v, v + 1000, -1, -(2**40)])[torch.randint(0, 4, (b, k), generator=g)]
        ids = torch.where(bad, junk, ids)
    num_drafts = torch.randint(-1, k + 2, (b,), generator=g, dtype=torch.int32)
    greedy = (torch.rand(b, generator=g) < 0.4) | (torch.arange(b) % 4 == 3)
    num_drafts[1::2] = k  # odd rows (1 and 3 among them) draft k tokens
    padding = torch.arange(k) >= num_drafts.clamp(0, k)[:, None]
    draft[padding] = float("nan")  # never read where it matters: must not leak into results
    uniforms, noise = draw_randoms(b, k, v, generator=g)
    return [t.to(DEVICE) for t in (ids, draft, target, uniforms, noise, num_drafts, greedy)]


CASES = [  # (B, k, V, block_v)
    (6, 0, 7, None),
    (8, 1, 2, None),
    (12, 3, 37, 16),
    (10, 4, 100, 32),
    (4, 2, 3000, None),  # default tile 2048: two tiles
]


@pytest.mark.parametrize("with_q", [True, False], ids=["q", "one_hot_q"])
@pytest.mark.parametrize("b,k,v,block_v", CASES)
def test_bitwise_equal_to_reference(b, k, v, block_v, with_q):
    ids, draft, target, u, noise, nd, greedy = _case(b, k, v, seed=b * 100 + k * 10 + v)
    q = draft if with_q else None
    accepted = 0
    for is_greedy in (None, greedy):
        ref_ids, ref_acc = rejection_sample(ids, q, target, u, noise, nd, is_greedy)
        out_ids, out_acc = triton_rejection_sample(
            ids, q, target, u, noise, nd, is_greedy, block_v=block_v
        )
        assert out_ids.dtype == ref_ids.dtype == torch.int64
        assert out_acc.dtype == ref_acc.dtype == torch.int32
        assert torch.equal(out_ids, ref_ids), (out_ids, ref_ids)
        assert torch.equal(out_acc, ref_acc)
        accepted += int(ref_acc.sum())
    if k:  # the case really accepts some drafts and rejects others
        assert 0 < accepted < 2 * int(nd.clamp(0, k).sum())


def test_out_of_vocabulary_ids_are_rejected_not_gathered():
    v = 6
    target = torch.zeros(2, 3, v)
    target[..., v - 1] = 1.0  # the clamped index would look like a sure accept
    ids = torch.tensor([[v, 0], [v + 1000, 0]])
    u, noise = draw_randoms(2, 2, v, generator=torch.Generator().manual_seed(0))
    nd = torch.tensor([2, 2], dtype=torch.int32)
    args = [t.to(DEVICE) for t in (ids, target, u, noise, nd)]
    out, acc = triton_rejection_sample(args[0], None, *args[1:])
    assert acc.tolist() == [0, 0]
    assert out.tolist() == [[v - 1, -1, -1], [v - 1, -1, -1]]


def test_catalog_entry():
    spec = next(s for s in all_specs() if s.name == "triton.rejection_sampling")
    assert spec.op == Op.REJECTION_SAMPLING and spec.backend == "triton" and spec.graph_safe
    cpu = KernelContext(Op.REJECTION_SAMPLING, "cpu", 0, "cpu", "float32")
    assert spec.supports(cpu).code == Reason.DEVICE_TYPE
    impl = spec.factory(KernelContext(Op.REJECTION_SAMPLING))
    assert isinstance(impl, TritonRejectionSampler) and impl.name == spec.name
    ids, draft, target, u, noise, nd, greedy = _case(5, 2, 9, seed=3)
    expect = rejection_sample(ids, draft, target, u, noise, nd, greedy)
    for fn in (impl, impl.run):
        got = fn(ids, draft, target, u, noise, nd, greedy)
        assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_bad_inputs_raise():
    ids, draft, target, u, noise, nd, _ = _case(3, 2, 5, seed=0)
    with pytest.raises(ValueError, match="num_drafts"):
        triton_rejection_sample(ids, draft, target, u, noise, nd.long())
    with pytest.raises(ValueError, match="draft_probs"):
        triton_rejection_sample(ids, draft[:, :1], target, u, noise, nd)
    with pytest.raises(ValueError, match="block_v"):
        triton_rejection_sample(ids, draft, target, u, noise, nd, block_v=24)
    out, acc = triton_rejection_sample(ids[:0], None, target[:0], u[:0], noise[:0], nd[:0])
    assert out.shape == (0, 3) and acc.shape == (0,)
