"""Triton RoPE against the model's torch RoPE (float64 reference), in place on strided views.
Runs under the Triton interpreter on the CPU and on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from layerzero_serve._models.layers import apply_rope  # noqa: E402
from layerzero_serve.kernels._triton.rope import triton_rope_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cos_sin(t, d, dtype):
    pos = torch.arange(t, dtype=torch.float64) * 7 + 3
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    return emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (8, 8, 64), (6, 2, 128)])
def test_matches_reference_on_fused_qkv_views(dtype, tol, hq, hk, d):
    t = 9
    g = torch.Generator().manual_seed(hq * 100 + d)
    qkv = torch.randn(t, (hq + 2 * hk) * d, generator=g).to(dtype).to(DEVICE)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v_before = qkv[:, (hq + hk) * d :].clone()
    cos, sin = _cos_sin(t, d, dtype)
    ref_q = apply_rope(q.double(), cos.double()[:, None], sin.double()[:, None])
    ref_k = apply_rope(k.double(), cos.double()[:, None], sin.double()[:, None])
    triton_rope_(q, k, cos, sin)
    torch.testing.assert_close(q.double(), ref_q, atol=tol, rtol=tol)
    torch.testing.assert_close(k.double(), ref_k, atol=tol, rtol=tol)
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)  # v untouched


def test_bad_shapes_raise():
    q = torch.zeros(3, 2, 12, device=DEVICE)
    cos = torch.zeros(3, 12, device=DEVICE)
    with pytest.raises(ValueError):
        triton_rope_(q, q, cos, cos)  # half of 12 is not a power of two
