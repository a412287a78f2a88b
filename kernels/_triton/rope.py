"""Rotary embedding (rotate-half convention) for q and k in one Triton launch, in place.

``triton_rope_(q [T, Hq, D], k [T, Hkv, D], cos [T, D], sin [T, D])``: one program per token
rotates every q and k head of that token: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``
with ``x1, x2`` the two halves of the head, computed in float32 and rounded once (the torch path
rounds after every op). ``cos``/``sin`` rows hold the angle twice (``cat(f, f)``), as the model's
rotary embedding builds them. q and k may be strided views (slices of a fused QKV output).
Graph-safe: no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_heads(
    x_ptr, stride_t, stride_h, t, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    base = x_ptr + t.to(tl.int64) * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(base, o1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF, o2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cs_stride_t,
    num_q_heads,
    num_k_heads,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):
    t = tl.program_id(0)
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + t.to(tl.int64) * cs_stride_t + dims).to(tl.float32)
    sin = tl.load(sin_ptr + t.to(tl.int64) * cs_stride_t + dims).to(tl.float32)
    _rope_heads(q_ptr, q_stride_t, q_stride_h, t, num_q_heads, cos, sin, HALF, BLOCK_QH)
    _rope_heads(k_ptr, k_stride_t, k_stride_h, t, num_k_heads, cos, sin, HALF, BLOCK_KH)


def triton_rope_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` in place (see the module docstring); returns them."""
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or cos.shape != (t, d) or sin.shape != cos.shape:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}")
    if d % 2 or (d // 2) & (d // 2 - 1):
        raise ValueError(f"head_dim {d}: half must be a power of two")
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError("the head dimension of q, k, cos and sin must be contiguous")
    if t == 0:
        return q, k
    _rope_kernel[(t,)](
        q,
        k,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        hq,
        k.shape[1],
        HALF=d // 2,
        BLOCK_QH=triton.next_power_of_2(hq),
        BLOCK_KH=triton.next_power_of_2(k.shape[1]),
    )
    return q, k
