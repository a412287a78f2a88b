"""Torch reference of speculative verification: exact greedy cases, padding rows and positions,
out-of-vocabulary draft ids (rejected, never gathered), sure accepts and rejects, random inputs,
validation, and its kernel-catalog entry."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels._catalog import all_specs
from layerzero_serve.kernels.spec import KernelContext, Op
from layerzero_serve.spec_decode._rejection import (
    TorchRejectionSampler,
    draw_randoms,
    greedy_verify,
    rejection_sample,
)

V = 12


def _targets(argmaxes: list[list[int]], v: int = V) -> torch.Tensor:
    """[B, k+1, V] distributions peaked (0.5) at the given ids, the rest spread evenly."""
    ids = torch.tensor(argmaxes)
    probs = torch.full((*ids.shape, v), 0.5 / (v - 1))
    probs.scatter_(2, ids[..., None], 0.5)
    return probs


def _greedy(draft_ids, target, num_drafts, seed=0):
    b, k = draft_ids.shape
    u, noise = draw_randoms(b, k, target.shape[2], generator=torch.Generator().manual_seed(seed))
    nd = torch.tensor(num_drafts, dtype=torch.int32)
    flags = torch.ones(b, dtype=torch.bool)
    return rejection_sample(draft_ids, None, target, u, noise, nd, flags)


@pytest.mark.parametrize(
    "drafts,num_drafts,out,acc",
    [
        ([5, 7, 2], 3, [5, 7, 2, 9], 3),  # all accepted: bonus = argmax at position 3
        ([5, 7, 3], 3, [5, 7, 2, -1], 2),  # mismatch at 2: the target's argmax there
        ([4, 7, 2], 3, [5, -1, -1, -1], 0),  # first draft wrong
        ([5, 7, 2], 1, [5, 7, -1, -1], 1),  # one real draft: bonus at position 1
        ([5, 7, 2], 0, [5, -1, -1, -1], 0),  # no drafts: plain greedy decoding
        ([5, 7, 2], -4, [5, -1, -1, -1], 0),  # negative count clamps to 0
        ([5, 7, 2], 9, [5, 7, 2, 9], 3),  # too large clamps to k
        ([5, V, 2], 3, [5, 7, -1, -1], 1),  # out-of-vocabulary id: rejected
    ],
)
def test_greedy_exact_cases(drafts, num_drafts, out, acc):
    target = _targets([[5, 7, 2, 9]])
    ids = torch.tensor([drafts])
    got_ids, got_acc = _greedy(ids, target, [num_drafts])
    assert got_ids.tolist() == [out] and got_acc.tolist() == [acc]
    assert got_acc.dtype == torch.int32 and got_ids.dtype == torch.int64
    target_ids = torch.tensor([[5, 7, 2, 9]])
    via_ids = greedy_verify(ids, target_ids, torch.tensor([num_drafts], dtype=torch.int32))
    assert via_ids[0].tolist() == [out] and via_ids[1].tolist() == [acc]


def test_greedy_ties_go_to_the_lowest_id_and_use_no_randomness():
    target = torch.zeros(1, 2, V)
    target[0, 0, [3, 8]] = 0.5  # tie between 3 and 8
    target[0, 1, 4] = 1.0
    for seed in range(5):
        assert _greedy(torch.tensor([[8]]), target, [1], seed)[0].tolist() == [[3, -1]]
        assert _greedy(torch.tensor([[3]]), target, [1], seed)[0].tolist() == [[3, 4]]


def test_mixed_batch_rows_are_independent():
    """A greedy row and a sampled row give the same result alone and together."""
    gen = torch.Generator().manual_seed(1)
    target = torch.rand(2, 3, V, generator=gen)
    target /= target.sum(-1, keepdim=True)
    ids = target[:, :2].argmax(-1)
    u, noise = draw_randoms(2, 2, V, generator=gen)
    nd = torch.tensor([2, 2], dtype=torch.int32)
    flags = torch.tensor([True, False])
    both = rejection_sample(ids, None, target, u, noise, nd, flags)
    for r in range(2):
        one = rejection_sample(
            ids[r : r + 1], None, target[r : r + 1], u[r : r + 1], noise[r : r + 1], nd[r : r + 1]
        )
        if flags[r]:
            one = _greedy(ids[r : r + 1], target[r : r + 1], [2])
        assert torch.equal(one[0], both[0][r : r + 1]) and torch.equal(one[1], both[1][r : r + 1])


@pytest.mark.parametrize("with_q", [False, True])
def test_out_of_vocabulary_ids_never_reach_a_gather(with_q):
    """ids V and V+1000 clamp to V-1 for the gather, where p = 1 would make any draft a sure
    accept: they must be rejected, and the implied one-hot q must not touch token V-1."""
    b = 200
    target = torch.zeros(b, 2, V)
    target[:, :, V - 1] = 0.5
    target[:, :, 0] = 0.5
    ids = torch.tensor([[V], [V + 1000], [-1], [-(2**62)]]).repeat(b // 4, 1)
    q = torch.full((b, 1, V), 1.0 / V) if with_q else None
    u, noise = draw_randoms(b, 1, V, generator=torch.Generator().manual_seed(2))
    out, acc = rejection_sample(ids, q, target, u, noise, torch.ones(b, dtype=torch.int32))
    assert acc.tolist() == [0] * b
    assert (out[:, 1] == -1).all()
    assert set(out[:, 0].tolist()) == {0, V - 1}  # drawn from the residual = p: both appear


def test_padding_positions_are_never_accepted_and_the_bonus_comes_from_position_n():
    k = 4
    target = torch.zeros(3, k + 1, V)
    target[..., 6] = 1.0  # every draft of 6 is a sure accept where real
    target[torch.arange(3), torch.tensor([0, 2, 4]), :] = 0.0
    target[torch.arange(3), torch.tensor([0, 2, 4]), 9] = 1.0  # the bonus positions say 9
    ids = torch.full((3, k), 6)
    nd = torch.tensor([0, 2, 4], dtype=torch.int32)
    u, noise = draw_randoms(3, k, V, generator=torch.Generator().manual_seed(0))
    out, acc = rejection_sample(ids, None, target, u, noise, nd)
    assert acc.tolist() == [0, 2, 4]
    assert out.tolist() == [[9, -1, -1, -1, -1], [6, 6, 9, -1, -1], [6, 6, 6, 6, 9]]


def test_padding_distributions_are_never_used():
    """NaN in q or p at padding positions changes nothing."""
    gen = torch.Generator().manual_seed(4)
    b, k = 16, 3
    target = torch.rand(b, k + 1, V, generator=gen)
    target /= target.sum(-1, keepdim=True)
    draft = torch.rand(b, k, V, generator=gen)
    draft /= draft.sum(-1, keepdim=True)
    ids = torch.multinomial(draft.reshape(-1, V), 1, generator=gen).reshape(b, k)
    nd = torch.arange(b, dtype=torch.int32) % (k + 1)
    u, noise = draw_randoms(b, k, V, generator=gen)
    clean = rejection_sample(ids, draft, target, u, noise, nd)
    pos = torch.arange(k + 1)
    target[pos > nd[:, None]] = float("nan")  # beyond the bonus position
    draft[pos[:k] >= nd[:, None]] = float("nan")
    dirty = rejection_sample(ids, draft, target, u, noise, nd)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


def test_sure_accept_and_sure_reject():
    target = torch.zeros(2, 2, V)
    target[0, 0, 3] = 1.0  # p(x) = 1 with one-hot q: accepted even for u just below 1
    target[1, 0, 4] = 1.0  # p(x) = 0: never accepted, even for u = 0
    target[:, 1, 7] = 1.0
    ids = torch.tensor([[3], [3]])
    u = torch.tensor([[1.0 - 2**-24], [0.0]])
    noise = torch.ones(2, V)
    out, acc = rejection_sample(ids, None, target, u, noise, torch.ones(2, dtype=torch.int32))
    assert out.tolist() == [[3, 7], [4, -1]] and acc.tolist() == [1, 0]


def test_resample_excludes_the_rejected_draft_mass():
    """p = (0.5, 0.5), q = (1, 0) with x = 0 rejected half the time: the residual is all on 1."""
    b = 400
    target = torch.zeros(b, 2, 2)
    target[:, 0] = 0.5
    target[:, 1, 0] = 1.0
    q = torch.tensor([1.0, 0.0]).expand(b, 1, 2)
    u, noise = draw_randoms(b, 1, 2, generator=torch.Generator().manual_seed(3))
    out, acc = rejection_sample(
        torch.zeros(b, 1, dtype=torch.long), q, target, u, noise, torch.ones(b, dtype=torch.int32)
    )
    assert (out[acc == 0, 0] == 1).all() and (out[acc == 1].tolist() == [[0, 0]] * int(acc.sum()))
    assert 150 < int(acc.sum()) < 250


def test_draw_randoms():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    u, noise = draw_randoms(5, 3, 11, generator=g1)
    assert u.shape == (5, 3) and noise.shape == (5, 11)
    assert u.dtype == noise.dtype == torch.float32
    assert ((u >= 0) & (u < 1)).all() and (noise > 0).all() and noise.isfinite().all()
    u2, noise2 = draw_randoms(5, 3, 11, generator=g2)
    assert torch.equal(u, u2) and torch.equal(noise, noise2)


def _valid_inputs(b=2, k=2, v=5):
    u, noise = draw_randoms(b, k, v, generator=torch.Generator().manual_seed(0))
    return dict(
        draft_ids=torch.zeros(b, k, dtype=torch.long),
        draft_probs=torch.full((b, k, v), 1 / v),
        target_probs=torch.full((b, k + 1, v), 1 / v),
        uniforms=u,
        noise=noise,
        num_drafts=torch.full((b,), k, dtype=torch.int32),
    )


@pytest.mark.parametrize(
    "param,bad",
    [
        ("draft_ids", torch.zeros(2, 2, dtype=torch.int32)),
        ("draft_ids", torch.zeros(2, 3, dtype=torch.long)),
        ("draft_probs", torch.zeros(2, 2, 4)),
        ("target_probs", torch.zeros(2, 3, 5, dtype=torch.float64)),
        ("target_probs", torch.zeros(2, 5)),
        ("uniforms", torch.zeros(2, 1)),
        ("noise", torch.zeros(2, 5, dtype=torch.float16)),
        ("num_drafts", torch.zeros(2, dtype=torch.long)),
        ("is_greedy", torch.zeros(2, dtype=torch.int32)),
    ],
)
def test_validation_names_the_parameter(param, bad):
    args = _valid_inputs()
    args[param] = bad
    with pytest.raises(ValidationError) as e:
        rejection_sample(**args)
    assert e.value.param == param


def test_k_zero_samples_one_token_from_p():
    target = torch.zeros(3, 1, V)
    target[:, 0, 4] = 1.0
    args = _valid_inputs(3, 0, V)
    args["target_probs"], args["draft_probs"] = target, None
    out, acc = rejection_sample(**args)
    assert out.tolist() == [[4]] * 3 and acc.tolist() == [0] * 3


def test_catalog_entry():
    spec = next(s for s in all_specs() if s.name == "torch.rejection_sampling")
    assert spec.op == Op.REJECTION_SAMPLING and spec.backend == "torch" and spec.graph_safe
    ctx = KernelContext(Op.REJECTION_SAMPLING, "cpu", 0, "cpu", "float32")
    assert spec.supports(ctx) is None
    impl = spec.factory(ctx)
    assert isinstance(impl, TorchRejectionSampler) and impl.name == spec.name
    args = _valid_inputs()
    expect = rejection_sample(**args)
    for fn in (impl, impl.run):
        got = fn(**args)
        assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
