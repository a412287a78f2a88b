"""FlashAttention adapters: FA2 ``flash_attn_with_kvcache`` with a block table (decode and
extend), FA3 (``flash_attn_interface``, Hopper) and FA4 (``flash_attn.cute``, Hopper and
Blackwell) through the same call shape.

Our cache ``[num_blocks, 2, block_size, Hkv, D]`` splits into ``k_cache = kv[:, 0]`` and
``v_cache = kv[:, 1]`` (``[num_blocks, block_size, Hkv, D]`` views, no copy), the paged layout
FlashAttention takes with ``block_table``. Queries are grouped per sequence: decode batches as
``[B, 1, Hq, D]``; varlen batches go through ``flash_attn_varlen_func`` with ``block_table``.

Constraints (FlashAttention README): fp16/bf16; head_dim <= 256 (multiple of 8); FA2 needs
SM 80+ and a paged block size that is a multiple of 256; FA3 SM 90 only; FA4 SM 90/100.
Neither library is installed on this project's machines: these adapters are declared for
selection and explain, and report "unavailable" with the import error.
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels.attention_api import ScatterKVWrite
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op, Reason, Rejection


class FlashAttnPaged(ScatterKVWrite):
    """plan/write_kv/run over ``flash_attn_with_kvcache`` / ``flash_attn_varlen_func``."""

    def __init__(self, ctx: KernelContext, module: str = "flash_attn") -> None:
        import importlib

        self._fa = importlib.import_module(module)
        self.ctx = ctx
        self.name = f"{module}.paged"

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[:, 0], kv_cache[:, 1]
        if self._decode:
            out = self._fa.flash_attn_with_kvcache(
                query.unsqueeze(1),
                k_cache,
                v_cache,
                cache_seqlens=meta.seq_lens,
                block_table=meta.block_tables,
                causal=True,
            )
            return out.squeeze(1)
        seqused_k = meta.seq_lens
        return self._fa.flash_attn_varlen_func(
            query,
            k_cache,
            v_cache,
            cu_seqlens_q=meta.query_start_loc,
            cu_seqlens_k=None,
            seqused_k=seqused_k,
            max_seqlen_q=meta.max_query_len,
            max_seqlen_k=meta.max_seq_len,
            causal=True,
            block_table=meta.block_tables,
        )


def _fa2_blocks(ctx: KernelContext) -> Rejection | None:
    if ctx.block_size % 256:
        return Rejection(
            Reason.BLOCK_SIZE,
            f"FA2 paged KV needs a block size multiple of 256, got {ctx.block_size}",
        )
    return None


_FP = frozenset({"float16", "bfloat16"})
_HEADS = frozenset(range(8, 257, 8))
DOC = "FlashAttention README (FA2 paged KV: page size multiple of 256; FA3 Hopper; FA4 cute)"


def _make(module: str):
    return lambda ctx: FlashAttnPaged(ctx, module)


SPECS = []
for _op in (Op.ATTN_DECODE, Op.ATTN_PREFILL, Op.ATTN_VERIFY):
    suffix = _op.value.removeprefix("attention_")
    SPECS += [
        KernelSpec(
            f"flash_attn.fa2_{suffix}",
            _op,
            "flash_attn",
            priority=80,
            graph_safe=True,
            dtypes=_FP,
            head_dims=_HEADS,
            min_sm=80,
            check=_fa2_blocks,
            factory=_make("flash_attn"),
            doc=DOC,
        ),
        KernelSpec(
            f"flash_attn.fa3_{suffix}",
            _op,
            "flash_attn",
            priority=110,
            graph_safe=True,
            dtypes=_FP,
            head_dims=_HEADS,
            min_sm=90,
            generations=frozenset({"hopper"}),
            factory=_make("flash_attn_interface"),
            doc=DOC,
        ),
        KernelSpec(
            f"flash_attn.fa4_{suffix}",
            _op,
            "flash_attn",
            priority=105,
            graph_safe=True,
            dtypes=_FP,
            head_dims=_HEADS,
            min_sm=90,
            generations=frozenset({"hopper", "blackwell"}),
            factory=_make("flash_attn.cute"),
            doc=DOC,
        ),
    ]
