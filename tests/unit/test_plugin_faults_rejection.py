"""Rejection sampling with a draft id outside the vocabulary and explicit draft distributions:
the draft is rejected (acceptance probability 0) and the token at its position follows the
target ``p`` itself, not the residual ``max(p - q, 0)`` (that id was never drawn from ``q``).
Handled on the device (no host sync: the function is CUDA-graph safe), so the check is on the
law of the outputs: chi-square against ``p`` with fixed seeds, for the torch reference, the
Triton kernel (interpreter on the CPU) and the FlashInfer adapter (a CPU stand-in chain)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_flashinfer_rejection_adapter import stand_in_chain  # noqa: E402

from layerzero_serve.kernels._flashinfer_rejection import chain_rejection_sample  # noqa: E402
from layerzero_serve.spec_decode import draw_randoms, rejection_sample  # noqa: E402

V = 6
ALPHA = 1e-3
# p puts little mass where q puts a lot: the residual max(p - q, 0) is far from p
P = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.04])
Q = torch.tensor([0.02, 0.03, 0.05, 0.10, 0.40, 0.40])
BAD_IDS = [V, V + 7, -1, -(2**40)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: the interpreter on the CPU


def _inputs(n: int, bad_id: int, seed: int, k: int = 2, bad_at: int = 0):
    """``n`` rows of ``k`` drafts; position ``bad_at`` holds ``bad_id``, earlier positions a
    sure accept (p is one-hot at the draft there); p at ``bad_at`` is ``P``."""
    target = P.repeat(n, k + 1, 1).clone()
    draft = Q.repeat(n, k, 1).clone()
    ids = torch.zeros(n, k, dtype=torch.long)
    for j in range(bad_at):  # sure accepts: p_j one-hot at id 1, the draft id 1
        target[:, j] = 0.0
        target[:, j, 1] = 1.0
        ids[:, j] = 1
    ids[:, bad_at] = bad_id
    gen = torch.Generator().manual_seed(seed)
    uniforms, noise = draw_randoms(n, k, V, generator=gen)
    num = torch.full((n,), k, dtype=torch.int32)
    return ids, draft, target, uniforms, noise, num


def _pvalue(tokens: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts.numel() == V
    expected = P.double() / P.double().sum() * counts.sum()
    return float(chisquare(counts.numpy(), expected.numpy()).pvalue)


def _check_law(fn, n: int, bad_id: int, seed: int, bad_at: int = 0, device="cpu") -> None:
    args = [a.to(device) for a in _inputs(n, bad_id, seed, bad_at=bad_at)]
    out, num_acc = (t.cpu() for t in fn(*args))
    assert (num_acc == bad_at).all()  # the bad draft is always rejected
    if bad_at:
        assert (out[:, :bad_at] == 1).all()
    tokens = out[:, bad_at]
    assert ((tokens >= 0) & (tokens < V)).all()
    assert (out[:, bad_at + 1 :] == -1).all()
    assert _pvalue(tokens) > ALPHA, "the token after an out-of-vocabulary draft must follow p"


@pytest.mark.parametrize("bad_id", BAD_IDS)
@pytest.mark.parametrize("bad_at", [0, 1])
def test_torch_reference_draws_from_the_target_after_an_out_of_vocab_draft(bad_id, bad_at):
    _check_law(rejection_sample, 40_000, bad_id, seed=11 + bad_at, bad_at=bad_at)


def test_torch_reference_residual_is_unchanged_for_in_vocab_drafts():
    """Control: a real draft (id 4, where q > p) that gets rejected still draws from the
    residual normalize(max(p - q, 0)), so the fix is specific to out-of-vocabulary ids."""
    ids, draft, target, u, noise, num = _inputs(40_000, 4, seed=5)
    u.fill_(0.999)  # 0.999 * q(4) = 0.3996 >= p(4) = 0.06: rejected
    out, num_acc = rejection_sample(ids, draft, target, u, noise, num)
    assert (num_acc == 0).all()
    residual = (P - Q).clamp_min(0).double()
    counts = torch.bincount(out[:, 0], minlength=V).double()
    keep = residual > 0
    assert (counts[~keep] == 0).all()
    expected = (residual[keep] / residual[keep].sum() * counts.sum()).numpy()
    assert chisquare(counts[keep].numpy(), expected).pvalue > ALPHA


def test_triton_kernel_draws_from_the_target_after_an_out_of_vocab_draft():
    pytest.importorskip("triton")
    from layerzero_serve.kernels._triton.rejection_sampling import triton_rejection_sample

    n = 500  # the interpreter runs one program per row (p and the residual differ a lot)
    _check_law(triton_rejection_sample, n, V, seed=21, device=DEVICE)
    # and bitwise equal to the (fixed) reference on the same random inputs
    for bad_id in BAD_IDS:
        args = [a.to(DEVICE) for a in _inputs(16, bad_id, seed=3)]
        ref = rejection_sample(*args)
        got = triton_rejection_sample(*args)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.parametrize("bad_id", [V, -1])
def test_flashinfer_adapter_draws_from_the_target_after_an_out_of_vocab_draft(bad_id):
    def adapter(*args):
        return chain_rejection_sample(stand_in_chain, *args)

    _check_law(adapter, 20_000, bad_id, seed=31)
