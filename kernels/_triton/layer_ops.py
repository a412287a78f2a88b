"""Specs of the project's Triton per-layer kernels (imports no Triton until built)."""

from __future__ import annotations

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op


def _rope(ctx: KernelContext):
    from layerzero_serve.kernels._triton.rope import triton_rope_

    return triton_rope_


def _rmsnorm(ctx: KernelContext):
    from layerzero_serve.kernels._triton.norm import TritonRMSNorm

    return TritonRMSNorm(ctx)


SPECS = [
    KernelSpec(
        "triton.rmsnorm",
        Op.RMSNORM,
        "triton",
        # Above Liger's RMSNorm (50): it also fuses the decoder's residual add into the norm
        # (one launch instead of two, twice per layer).
        priority=70,
        graph_safe=True,
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({"float16", "bfloat16", "float32"}),
        min_sm=70,
        factory=_rmsnorm,
        doc="kernels/_triton/norm.py: RMSNorm and fused residual-add + RMSNorm, one program/token",
    ),
    KernelSpec(
        "triton.rope",
        Op.ROPE,
        "triton",
        priority=60,  # one launch for q and k, in place: above Liger's per-tensor RoPE
        graph_safe=True,
        device_types=frozenset({"cuda"}),
        dtypes=frozenset({"float16", "bfloat16", "float32"}),
        min_sm=70,
        factory=_rope,
        doc="kernels/_triton/rope.py: rotate-half RoPE of q and k in one launch",
    ),
]
