"""Liger (Triton) kernels for the per-layer ops: RMSNorm, RoPE, SwiGLU.

Wrappers keep torch-equivalent signatures so a model can swap them in:

* ``rmsnorm(x [T, H], weight [H], eps) -> [T, H]``
* ``rope(q [T, Hq, D], k [T, Hkv, D], cos [T, D], sin [T, D]) -> (q, k)`` (rotate-half)
* ``swiglu(gate [T, I], up [T, I]) -> silu(gate) * up``

Constraints (liger-kernel docs): CUDA only (Triton kernels), fp16/bf16/fp32; graph-safe (no
host sync).
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op


class LigerRMSNorm:
    def __init__(self, ctx: KernelContext | None = None) -> None:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        self._fn = LigerRMSNormFunction

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Llama casting: normalise in float32, cast back, then scale by the weight.
        return self._fn.apply(x, weight, eps, 0.0, "llama", False)


class LigerRoPE:
    def __init__(self, ctx: KernelContext | None = None) -> None:
        from liger_kernel.ops.rope import LigerRopeFunction

        self._fn = LigerRopeFunction

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Liger expects [batch, heads, seq, D] and cos/sin [1 or batch, seq, D].
        qh = q.transpose(0, 1).unsqueeze(0)
        kh = k.transpose(0, 1).unsqueeze(0)
        q2, k2 = self._fn.apply(qh, kh, cos.unsqueeze(0), sin.unsqueeze(0))
        return q2[0].transpose(0, 1), k2[0].transpose(0, 1)


class LigerSwiGLU:
    def __init__(self, ctx: KernelContext | None = None) -> None:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        self._fn = LigerSiLUMulFunction

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._fn.apply(gate, up)


_DT = frozenset({"float16", "bfloat16", "float32"})
DOC = "liger-kernel 0.8 ops: rms_norm, rope, swiglu (Triton, CUDA)"
SPECS = [
    KernelSpec(
        "liger.rmsnorm",
        Op.RMSNORM,
        "liger_kernel",
        priority=50,
        graph_safe=True,
        dtypes=_DT,
        min_sm=70,
        factory=LigerRMSNorm,
        doc=DOC,
    ),
    KernelSpec(
        "liger.rope",
        Op.ROPE,
        "liger_kernel",
        priority=50,
        graph_safe=True,
        dtypes=_DT,
        min_sm=70,
        factory=LigerRoPE,
        doc=DOC,
    ),
    KernelSpec(
        "liger.swiglu",
        Op.SWIGLU,
        "liger_kernel",
        priority=50,
        graph_safe=True,
        dtypes=_DT,
        min_sm=70,
        factory=LigerSwiGLU,
        doc=DOC,
    ),
]
