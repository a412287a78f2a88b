"""Triton RMSNorm and fused residual-add + RMSNorm against a float64 reference (CPU under the
interpreter via conftest, GPU when present); the updated residual is bitwise torch's add."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.kernels._triton.norm import TritonRMSNorm, triton_add_rmsnorm, triton_rmsnorm

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """float64 normalisation of the dtype-rounded input, cast like the Llama reference."""
    x64 = x.double()
    y = (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (w.double() * y.double()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 96, 4096])
def test_rmsnorm_and_fused_add(dtype, hidden):
    g = torch.Generator().manual_seed(hidden)
    t = 5
    x = torch.randn(t, hidden, generator=g).to(DEV, dtype)
    res = (3 * torch.randn(t, hidden, generator=g)).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEV, dtype)
    eps = 1e-6
    tol = TOL[dtype]
    torch.testing.assert_close(triton_rmsnorm(x, w, eps), _ref(x, w, eps), atol=tol, rtol=tol)
    want_res = res + x
    out, new_res = triton_add_rmsnorm(x, res, w, eps)
    assert new_res.data_ptr() == res.data_ptr()  # in place
    assert torch.equal(new_res, want_res)  # one rounding, like torch's add
    torch.testing.assert_close(out, _ref(want_res, w, eps), atol=tol, rtol=tol)


def test_strided_rows_and_3d_call():
    x = torch.randn(4, 2 * 64, device=DEV)[:, :64]  # row stride 128, contiguous last dim
    w = torch.ones(64, device=DEV)
    torch.testing.assert_close(triton_rmsnorm(x, w, 1e-5), _ref(x, w, 1e-5), atol=1e-5, rtol=1e-5)
    q = torch.randn(3, 4, 16, device=DEV)  # q_norm over heads: [T, H, D]
    got = TritonRMSNorm()(q, torch.ones(16, device=DEV), 1e-6)
    torch.testing.assert_close(got, _ref(q, torch.ones(16, device=DEV), 1e-6), atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        triton_rmsnorm(x, torch.ones(4, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        triton_add_rmsnorm(x, torch.randn(2, 4, device=DEV), torch.ones(8, device=DEV), 1e-6)
