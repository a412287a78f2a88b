"""RMSNorm and fused residual-add + RMSNorm, one Triton program per token.

* ``triton_rmsnorm(x [T, H], weight [H], eps) -> [T, H]``
* ``triton_add_rmsnorm(x [T, H], residual [T, H], weight [H], eps) -> (normed, residual)``:
  ``residual += x`` in place (rounded to the dtype once, as torch's ``residual + x`` does),
  then ``normed = rmsnorm(residual)``. One launch replaces the decoder's add and norm.

Numerics follow the Llama/HF reference: the (rounded) input is normalised in float32,
``x * rsqrt(mean(x^2) + eps)`` is cast to the dtype, then multiplied by the weight in the
dtype. Only the order of the sum of squares differs from torch's reduction. Graph-safe: no host
synchronisation; rows are contiguous in the last dim (any row stride).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even. bfloat16 is rounded on the bits, which
    also holds under Triton's CPU interpreter (whose bfloat16 cast truncates)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    hidden,
    eps,
    ADD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # One rounding of the fp32 sum to the dtype, like torch's elementwise add.
        x = _round_to(x.to(tl.float32) + r.to(tl.float32), res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    y = _round_to(xf * inv, out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # The weight product of two 16-bit values is exact in fp32, so rounding it once equals the
    # reference's multiply in the dtype (and avoids 16-bit arithmetic in the interpreter).
    prod = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, _round_to(prod, out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, add):
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, H] with a contiguous last dim, got {tuple(x.shape)}")
    t, h = x.shape
    if weight.shape != (h,):
        raise ValueError(f"weight must be [{h}], got {tuple(weight.shape)}")
    out = torch.empty_like(x)
    if t == 0:
        return out
    res = residual if add else x
    block = triton.next_power_of_2(h)
    _rmsnorm_kernel[(t,)](
        x,
        res,
        weight,
        out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        h,
        float(eps),
        ADD=add,
        BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out


def triton_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` over the last dim; ``x [T, H]``, ``weight [H]``, same dtype."""
    return _launch(x, None, weight, eps, False)


def triton_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` (in place) then ``(weight * rmsnorm(residual), residual)``."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1:
        raise ValueError("residual must match x's shape and dtype, contiguous in the last dim")
    return _launch(x, residual, weight, eps, True), residual


class TritonRMSNorm:
    """``Op.RMSNORM`` implementation: callable as a plain RMSNorm, and offers the fused
    residual add (``add_rmsnorm``) that the model's fast path uses between layers."""

    name = "triton.rmsnorm"

    def __init__(self, ctx=None) -> None:
        pass

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        return triton_rmsnorm(x.reshape(-1, shape[-1]), weight, eps).reshape(shape)

    @staticmethod
    def add_rmsnorm(x, residual, weight, eps):
        return triton_add_rmsnorm(x, residual, weight, eps)
