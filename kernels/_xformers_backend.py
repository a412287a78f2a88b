"""xFormers adapter: ``memory_efficient_attention_forward`` over the paged cache with the paged,
block-diagonal, bottom-right causal bias ``PagedBlockDiagonalCausalWithOffsetPaddedKeysMask``.

That bias (``xformers.ops.fmha.attn_bias``) takes ``q_seqlen`` / ``kv_seqlen`` host lists, a
``[batch, max_pages]`` block table and the page size, and expects K/V as
``[1, max_pages * page_size, G, H, D]`` (BMGHK: ``G`` KV-head groups, ``H`` query heads per
group, the K/V head dim broadcast with a zero stride). Queries go as ``[1, T, G, H, D]``.

No copy of the cache: our layer cache ``[N, 2, bs, Hkv, D]`` flattened is
``[2N * bs, Hkv, D]`` with K of block ``b`` at pages ``2b`` and V of block ``b`` at ``2b + 1``
(in units of ``bs`` rows). So ``k = flat[: (2N - 1) * bs]`` and ``v = flat[bs:]`` (both
contiguous, same length) with the block table doubled (``2 * block_tables``) address K and V
of every block exactly.

Constraints (xFormers ``fmha`` operators): CUDA, fp16/bf16; the paged biases are served by the
Flash (FA2/FA3) and Triton split-K forward operators, SM 80+; head_dim <= 128 on the split-K
path. The bias is built from host lists every step: not graph-safe. On this project's GPU
machine the xFormers CUDA extension was built for another torch and does not load, so the
backend probes unavailable with that reason; this adapter has never run here.
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels.attention_api import ScatterKVWrite
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op


class XFormersPaged(ScatterKVWrite):
    def __init__(self, ctx: KernelContext) -> None:
        import xformers.ops as xops  # lazy: only when the kernel is built
        from xformers.ops.fmha import attn_bias

        self._xops, self._bias_mod = xops, attn_bias
        self.ctx = ctx
        self.name = "xformers.paged"
        self._bias = None
        self._num_tokens = 0

    def plan(self, meta: AttentionMetadata) -> None:
        super().plan(meta)
        qsl = meta.query_start_loc_cpu
        q_lens = [b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)]
        self._num_tokens = qsl[-1] if qsl else 0
        mask_cls = self._bias_mod.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask
        self._bias = mask_cls.from_seqlens(
            q_seqlen=q_lens,
            kv_seqlen=list(meta.seq_lens_cpu),
            block_tables=meta.block_tables * 2,  # K at page 2b, V at page 2b (+ bs offset)
            page_size=meta.block_size,
        )

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hkv, d = kv_cache.shape[3], kv_cache.shape[4]
        bs = kv_cache.shape[2]
        g = query.shape[1] // hkv
        flat = kv_cache.view(1, -1, hkv, 1, d)  # [1, 2N*bs, Hkv, 1, D]; needs a contiguous cache
        k = flat[:, :-bs].expand(-1, -1, -1, g, -1)
        v = flat[:, bs:].expand(-1, -1, -1, g, -1)
        n = self._num_tokens
        q = query[:n].reshape(1, n, hkv, g, d)
        out = self._xops.memory_efficient_attention_forward(q, k, v, attn_bias=self._bias)
        out = out.reshape(n, query.shape[1], d)
        if n == query.shape[0]:
            return out
        full = torch.zeros_like(query)  # padding rows past the last sequence
        full[:n] = out
        return full


_FP = frozenset({"float16", "bfloat16"})
DOC = (
    "xFormers fmha: PagedBlockDiagonalCausalWithOffsetPaddedKeysMask (BMGHK K/V, page table), "
    "fp16/bf16 CUDA operators, SM 80+; head_dim <= 128 (split-K path)"
)
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
