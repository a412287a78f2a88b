"""Batch-1 projection (GEMV) with the decoder's elementwise step fused into its prologue.

At batch 1 a decode step is a chain of weight-streaming GEMVs separated by tiny elementwise
kernels (RMSNorm, SwiGLU, cuBLAS's split-K reduce). Each tiny kernel costs a launch slot
inside the CUDA graph (~2-3 µs) for almost no work, so the chain loses 10-20% of the step to
them. Here every program recomputes the cheap prologue on the fly from the (L2-resident)
activation vector, so the separate kernels disappear:

* ``PLAIN``:    ``y = x @ W.T``
* ``NORM``:     ``y = rmsnorm(x) * w_norm @ W.T``
* ``ADD_NORM``: ``h = x + residual`` (one rounding, written to ``residual_out`` by program 0),
  ``y = rmsnorm(h) * w_norm @ W.T``
* ``SWIGLU``:   ``x = [gate | up]`` (``[2K]``), ``y = (silu(gate) * up) @ W.T``

The prologue rounds to the dtype exactly where the unfused Llama/HF path does (the sum, the
normalised value, the weight product, silu, the gated product), so only the order of the dot
products' fp32 sums differs from the unfused kernels. Shapes: ``x [1, K]`` (``[1, 2K]`` for
SWIGLU), ``W [N, K]`` contiguous, output ``[1, N]`` in ``W``'s dtype. Graph-safe: no host
synchronisation, no allocation besides the outputs.

Status: an experiment, not selected by the engine. On the H200 it matches cuBLAS on the
4096-wide projections and beats norm + cuBLAS on Llama-3-8B's gate/up in isolation (60.9 vs
64.1 µs, ``bench/results/gemv_sweep_gpu_h200.json``), but inside the decode graph the fused
gate/up took 62.3 µs against 57.3 + 2.5 µs for cuBLAS + the norm kernel, and the step did not
get faster; the down projection (K = 14336, 128 programs) reaches only 2.7 TB/s without split-K.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from layerzero_serve.kernels._triton.norm import _round_to

PLAIN, NORM, ADD_NORM, SWIGLU = 0, 1, 2, 3


@triton.jit
def _residual_chunk(x_ptr, r_ptr, kk, km, PROLOGUE: tl.constexpr, dt: tl.constexpr):
    """The residual-stream values ``h[kk]`` the norm reads (``x + residual`` rounded once)."""
    x = tl.load(x_ptr + kk, mask=km, other=0.0)
    if PROLOGUE == 2:
        r = tl.load(r_ptr + kk, mask=km, other=0.0)
        x = _round_to(x.to(tl.float32) + r.to(tl.float32), dt)
    return x


@triton.jit
def _gemv_kernel(
    x_ptr,
    r_ptr,
    r_out_ptr,
    nw_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    N,
    K,
    eps,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_POW2: tl.constexpr,
    IEEE: tl.constexpr,
):
    # The dot products run on the tensor cores as a [16, BLOCK_K] x [BLOCK_K, BLOCK_N] tile
    # product whose row 0 holds the token (the other rows are zeros): tl.dot's operands are
    # what Triton's software pipeliner streams through shared memory (num_stages deep), which
    # a plain load + reduce is not, and a GEMV lives or dies by the weight bytes in flight.
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    inv = 0.0
    if PROLOGUE == 1 or PROLOGUE == 2:
        # Every program needs the whole row's RMS: recompute it (K values, one L2 round trip)
        # rather than pay a separate launch for it.
        ka = tl.arange(0, K_POW2)
        hf = _residual_chunk(x_ptr, r_ptr, ka, ka < K, PROLOGUE, dt).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / K + eps)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * K
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        km = kk < K
        if PROLOGUE == 0:
            xv = tl.load(x_ptr + kk, mask=km, other=0.0)
        elif PROLOGUE == 3:
            g = tl.load(x_ptr + kk, mask=km, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + kk, mask=km, other=0.0).to(tl.float32)
            s = _round_to(g / (1.0 + tl.exp(-g)), dt).to(tl.float32)
            xv = _round_to(s * u, dt)
        else:
            h = _residual_chunk(x_ptr, r_ptr, kk, km, PROLOGUE, dt)
            if PROLOGUE == 2:
                # program 0 alone writes the new residual stream
                tl.store(r_out_ptr + kk, h, mask=kk < tl.where(pid == 0, K, 0))
            y = _round_to(h.to(tl.float32) * inv, dt).to(tl.float32)
            nw = tl.load(nw_ptr + kk, mask=km, other=0.0).to(tl.float32)
            xv = _round_to(nw * y, dt)
        xb = tl.where(tl.arange(0, 16)[:, None] == 0, xv[None, :], tl.zeros([16, BLOCK_K], dt))
        w = tl.load(w_cols + kk[:, None], mask=km[:, None] & n_mask[None, :], other=0.0)
        if IEEE:  # float32 weights, or the CPU interpreter (whose 16-bit dot is not exact)
            acc += tl.dot(xb.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xb, w)
    out = tl.sum(acc, 0)  # row 0 holds the token, the other rows are exact zeros
    if HAS_BIAS:
        out += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn, _round_to(out, dt), mask=n_mask)


def default_config(n: int, k: int) -> tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps, num_stages)`` for an ``[n, k]`` weight, the best of the
    H200 sweep (bench/gemv_sweep_gpu.py): wide tiles for wide weights, 512-byte row segments
    and enough programs for every SM otherwise."""
    return (64, 128, 4, 4) if n >= 16384 else (32, 256, 4, 3)


def triton_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: int = PLAIN,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y [1, N], new_residual [1, K] or None)`` for one token ``x`` (see the module doc).

    ``x`` is ``[1, K]`` (``[1, 2K]`` for ``SWIGLU``), ``weight [N, K]``, ``bias [N]``,
    ``residual`` and ``norm_weight`` ``[1, K]`` / ``[K]`` for the norm prologues; all in one
    16/32-bit float dtype on one device, contiguous. ``ADD_NORM`` returns ``x + residual`` as a
    new tensor (the input residual is not modified)."""
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [N, K] matrix, got {tuple(weight.shape)}")
    n, k = weight.shape
    width = 2 * k if prologue == SWIGLU else k
    if x.shape != (1, width) or not x.is_contiguous() or x.dtype != weight.dtype:
        raise ValueError(f"x must be a contiguous [1, {width}] {weight.dtype}, got {x.shape}")
    if prologue not in (PLAIN, NORM, ADD_NORM, SWIGLU):
        raise ValueError(f"prologue must be one of 0..3, got {prologue}")
    if prologue in (NORM, ADD_NORM) and (norm_weight is None or norm_weight.shape != (k,)):
        raise ValueError(f"norm_weight must be [{k}] for the norm prologues")
    if prologue == ADD_NORM and (residual is None or residual.shape != (1, k)):
        raise ValueError(f"residual must be [1, {k}] for ADD_NORM")
    out = torch.empty((1, n), dtype=weight.dtype, device=weight.device)
    new_res = torch.empty_like(x) if prologue == ADD_NORM else None
    block_n, block_k, warps, stages = config or default_config(n, k)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        residual if residual is not None else x,
        new_res if new_res is not None else out,
        norm_weight if norm_weight is not None else x,
        weight,
        bias if bias is not None else out,
        out,
        n,
        k,
        float(eps),
        PROLOGUE=prologue,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        K_POW2=triton.next_power_of_2(k),
        IEEE=weight.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=warps,
        num_stages=stages,
    )
    return out, new_res
