"""The fused batch-1 GEMV (kernels/_triton/gemv.py) against a float64 reference of the unfused
Llama path (CPU under the interpreter via conftest, GPU natively): every prologue, bias or not,
N and K that are not multiples of the tile, three dtypes; the new residual is bitwise torch's
add and the input residual is left alone."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.kernels._triton.gemv import ADD_NORM, NORM, PLAIN, SWIGLU, triton_gemv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
SHAPES = [(40, 512), (130, 384), (8, 64)] + ([(6144, 4096)] if DEV == "cuda" else [])


def _norm(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama RMSNorm of the dtype-rounded ``h``: float64 normalisation, cast, weight."""
    h64 = h.double()
    y = (h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return (w.double() * y.double()).to(h.dtype)


def _reference_input(prologue, x, res, nw, eps):
    k = nw.shape[0]
    if prologue == PLAIN:
        return x
    if prologue == NORM:
        return _norm(x, nw, eps)
    if prologue == ADD_NORM:
        return _norm(x + res, nw, eps)
    gate, up = x[:, :k].double(), x[:, k:].double()
    silu = (gate * torch.sigmoid(gate)).to(x.dtype).double()
    return (silu * up).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prologue", [PLAIN, NORM, ADD_NORM, SWIGLU])
@pytest.mark.parametrize("n,k", SHAPES)
def test_fused_gemv_matches_float64_reference(dtype, prologue, n, k):
    g = torch.Generator().manual_seed(n * 7 + k + prologue)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEV, dtype)
    bias = torch.randn(n, generator=g).to(DEV, dtype) if n % 2 == 0 else None
    width = 2 * k if prologue == SWIGLU else k
    x = torch.randn(1, width, generator=g).to(DEV, dtype)
    res = (2 * torch.randn(1, k, generator=g)).to(DEV, dtype)
    res_before = res.clone()
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEV, dtype)
    eps = 1e-5
    y, new_res = triton_gemv(
        x, w, bias, prologue=prologue, residual=res, norm_weight=nw, eps=eps, config=None
    )
    inp = _reference_input(prologue, x, res, nw, eps).double()
    want = inp @ w.double().T + (bias.double() if bias is not None else 0.0)
    tol = TOL[dtype]
    assert y.shape == (1, n) and y.dtype == dtype
    torch.testing.assert_close(y.double(), want, atol=tol * want.abs().max().item(), rtol=tol)
    assert torch.equal(res, res_before)
    if prologue == ADD_NORM:
        assert torch.equal(new_res, x + res)  # one rounding, like the decoder's residual add
    else:
        assert new_res is None


@pytest.mark.parametrize("config", [(8, 128, 4, 2), (32, 64, 4, 3)])
def test_tile_configs_agree(config):
    """Another tiling only reorders the fp32 sums."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(72, 320, generator=g).to(DEV)
    x = torch.randn(1, 320, generator=g).to(DEV)
    a, _ = triton_gemv(x, w, config=config)
    b, _ = triton_gemv(x, w)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_bad_inputs_raise():
    w = torch.randn(16, 32, device=DEV)
    with pytest.raises(ValueError, match="x must be"):
        triton_gemv(torch.randn(2, 32, device=DEV), w)
    with pytest.raises(ValueError, match="x must be"):
        triton_gemv(torch.randn(1, 32, device=DEV), w, prologue=SWIGLU)  # needs [1, 64]
    with pytest.raises(ValueError, match="weight"):
        triton_gemv(torch.randn(1, 32, device=DEV), w.T)
    with pytest.raises(ValueError, match="norm_weight"):
        triton_gemv(torch.randn(1, 32, device=DEV), w, prologue=NORM)
    with pytest.raises(ValueError, match="residual"):
        triton_gemv(
            torch.randn(1, 32, device=DEV),
            w,
            prologue=ADD_NORM,
            norm_weight=torch.ones(32, device=DEV),
        )
    with pytest.raises(ValueError, match="prologue"):
        triton_gemv(torch.randn(1, 32, device=DEV), w, prologue=7)
