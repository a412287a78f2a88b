"""Specs of the project's Triton per-layer kernels (imports no Triton until built)."""

from __future__ import annotations

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op


def _rope(ctx: KernelContext):
    from layerzero_serve.kernels.triton.rope import triton_rope_

    return triton_rope_


SPECS = [
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
        doc="kernels/triton/rope.py: rotate-half RoPE of q and k in one launch",
    ),
]
