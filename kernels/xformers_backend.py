"""xFormers adapter: ``memory_efficient_attention`` over the paged cache with a paged,
block-diagonal causal bias (``PagedBlockDiagonalCausalWithOffsetPaddedKeysMask``).

Constraints (xFormers docs): CUDA, fp16/bf16, head_dim <= 128 for the paged path, SM 80+.
On this project's GPU machine the xFormers CUDA extension was built for another torch and does
not load, so the backend probes as unavailable with that reason.
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels.attention_api import ScatterKVWrite
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op


class XFormersPaged(ScatterKVWrite):
    def __init__(self, ctx: KernelContext) -> None:
        import xformers.ops as xops
        from xformers.ops.fmha import attn_bias

        self._xops, self._bias = xops, attn_bias
        self.ctx = ctx
        self.name = "xformers.paged"

    def plan(self, meta: AttentionMetadata) -> None:
        q_lens = [
            b - a
            for a, b in zip(
                meta.query_start_loc_cpu[:-1], meta.query_start_loc_cpu[1:], strict=True
            )
        ]
        self._mask = self._bias.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
            q_seqlen=q_lens,
            kv_seqlen=meta.seq_lens_cpu,
            block_tables=meta.block_tables,
            page_size=meta.block_size,
        )

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        g = self.ctx.gqa_ratio
        k = kv_cache[:, 0].reshape(1, -1, self.ctx.num_kv_heads, 1, self.ctx.head_dim)
        v = kv_cache[:, 1].reshape(1, -1, self.ctx.num_kv_heads, 1, self.ctx.head_dim)
        q = query.view(1, query.shape[0], self.ctx.num_kv_heads, g, self.ctx.head_dim)
        out = self._xops.memory_efficient_attention_forward(
            q, k.expand(-1, -1, -1, g, -1), v.expand(-1, -1, -1, g, -1), attn_bias=self._mask
        )
        return out.reshape(query.shape)


_FP = frozenset({"float16", "bfloat16"})
DOC = "xFormers fmha docs: paged attention biases (fp16/bf16, head_dim <= 128)"
SPECS = [
    KernelSpec(
        f"xformers.{op.value.removeprefix('attention_')}",
        op,
        "xformers",
        priority=60,
        graph_safe=False,
        dtypes=_FP,
        head_dims=frozenset(range(8, 129, 8)),
        min_sm=80,
        factory=XFormersPaged,
        doc=DOC,
    )
    for op in (Op.ATTN_DECODE, Op.ATTN_PREFILL, Op.ATTN_VERIFY)
]
