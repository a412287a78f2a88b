"""FlashAttention adapters: FA2 (``flash_attn``), FA3 (``flash_attn_interface``, Hopper) and FA4
(``flash_attn.cute``, CuTe DSL) over our paged cache.

Our cache ``[num_blocks, 2, block_size, Hkv, D]`` splits into ``k_cache = kv[:, 0]`` and
``v_cache = kv[:, 1]``: ``[num_blocks, block_size, Hkv, D]`` views (no copy; the block stride is
``2 * block_size * Hkv * D``, the last dim is contiguous as every version asserts), which is the
paged layout all three take together with a ``[batch, max_blocks]`` int32 block table.

Two call paths per version, chosen in ``plan`` from host ints:

* uniform batches (every row has the same query length ``L``: decode ``L = 1``, verification
  ``L = k + 1``): queries as ``[B, L, Hq, D]``; FA2/FA3 ``flash_attn_with_kvcache`` with
  ``cache_seqlens = seq_lens`` and the block table (FA2 names it ``block_table``, FA3
  ``page_table``); FA4 ``flash_attn_varlen_func`` with ``seqused_k`` and ``page_table``. Every
  shape comes from tensors, nothing is read back: CUDA-graph safe.
* ragged batches (prefill, extend, chunked, mixed): packed queries with ``cu_seqlens_q =
  query_start_loc``. FA2 ``flash_attn_varlen_func(..., block_table=)`` takes ``cu_seqlens_k``
  (built on the device from ``seq_lens``, no sync); FA3 ``flash_attn_with_kvcache`` with
  ``cu_seqlens_q``/``max_seqlen_q``; FA4 ``flash_attn_varlen_func`` with ``seqused_k``. The
  host ``max_seqlen_*`` size the launch: not graph-safe.

Causal masks are bottom-right aligned in every version (query ``j`` of a row of ``q`` tokens sees
keys up to ``seq_len - q + j``), which is our convention. Padding query rows past
``query_start_loc[-1]`` come back as zeros.

Constraints and their sources:

* FA2 (``flash_attn/flash_attn_interface.py`` docstrings, README): fp16/bf16; head_dim <= 256
  (multiple of 8 for the paged path); SM 80+ (Ampere/Ada/Hopper); paged KV: "page_block_size
  must be a multiple of 256".
* FA3 (README: "Requirements: H100 / H800 GPU"; ``hopper/flash_attn_interface.py``): fp16/bf16
  (fp8 forward not used here); head_dim <= 256, rounded up to 64/96/128/192/256; "page_block_size
  can be arbitrary".
* FA4 (``flash_attn/cute/interface.py``: "hdim 64, 96, 128"; asserts ``arch // 10 in [9, 10,
  11]`` and "paged KV not supported on SM 9.0"): fp16/bf16; paged KV on SM 100/110 only; any page
  size (128 uses TMA, others a non-TMA path).

None of these libraries is installed on this project's machines: the specs are declared for
selection and explain, and the backend probes "unavailable" with the import error. The adapters
are written against the documented signatures but have never run here.
"""

from __future__ import annotations

import importlib

import torch

from layerzero_serve.kernels.attention_api import ScatterKVWrite
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op, Reason, Rejection

MODULES = {2: "flash_attn", 3: "flash_attn_interface", 4: "flash_attn.cute"}


class FlashAttnPaged(ScatterKVWrite):
    """plan/write_kv/run over FlashAttention ``version`` 2, 3 or 4 (see module docstring).

    KV writes use the graph-safe torch scatter (``ScatterKVWrite``): FlashAttention's own append
    (``k=``/``v=`` of ``flash_attn_with_kvcache``) writes at ``cache_seqlens`` and would need a
    second length convention.
    """

    def __init__(self, ctx: KernelContext, version: int = 2) -> None:
        if version not in MODULES:
            raise ValueError(f"FlashAttention version must be one of {sorted(MODULES)}")
        self._fa = importlib.import_module(MODULES[version])  # lazy: only when built
        self.ctx = ctx
        self.version = version
        self.name = f"flash_attn.fa{version}"
        self._uniform_len = 0  # L when every row has L query tokens, else 0 (ragged)
        self._num_tokens = 0
        self._cu_seqlens_k: torch.Tensor | None = None

    def plan(self, meta: AttentionMetadata) -> None:
        super().plan(meta)
        qsl = meta.query_start_loc_cpu
        self._num_tokens = qsl[-1] if qsl else 0
        lens = {b - a for a, b in zip(qsl[:-1], qsl[1:], strict=True)}
        uniform = len(lens) == 1 and meta.num_tokens == meta.num_seqs * meta.max_query_len
        self._uniform_len = meta.max_query_len if uniform else 0
        self._cu_seqlens_k = None
        if not uniform and self.version == 2:
            # FA2's varlen path takes cumulative KV lengths; built on the device, no sync.
            cum = torch.cumsum(meta.seq_lens, 0, dtype=torch.int32)
            self._cu_seqlens_k = torch.nn.functional.pad(cum, (1, 0))

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[:, 0], kv_cache[:, 1]  # [N, bs, Hkv, D] views
        if self._uniform_len:
            b, length = meta.num_seqs, self._uniform_len
            q = query.reshape(b, length, *query.shape[1:])
            out = self._uniform(q, k_cache, v_cache, meta)
            return out.reshape(query.shape)
        n = self._num_tokens
        out = self._ragged(query[:n], k_cache, v_cache, meta)
        if n == query.shape[0]:
            return out
        full = torch.zeros_like(query)  # padding rows past the last sequence
        full[:n] = out
        return full

    def _uniform(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        # FA2 calls the page table block_table, FA3/FA4 page_table; FA4 has no kvcache entry.
        pages = {"block_table" if self.version == 2 else "page_table": meta.block_tables}
        if self.version in (2, 3):
            return self._fa.flash_attn_with_kvcache(
                q, k_cache, v_cache, cache_seqlens=meta.seq_lens, causal=True, **pages
            )
        out = self._fa.flash_attn_varlen_func(
            q, k_cache, v_cache, seqused_k=meta.seq_lens, causal=True, **pages
        )
        return out[0] if isinstance(out, tuple) else out  # FA4 may return (out, lse)

    def _ragged(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        fa = self._fa
        ragged_q = {"cu_seqlens_q": meta.query_start_loc, "max_seqlen_q": meta.max_query_len}
        if self.version == 2:  # FA2's varlen entry wants the key offsets and maximum too
            return fa.flash_attn_varlen_func(
                q, k_cache, v_cache, cu_seqlens_k=self._cu_seqlens_k,
                max_seqlen_k=meta.max_seq_len, causal=True, block_table=meta.block_tables,
                **ragged_q,
            )  # fmt: skip
        if self.version == 3:
            return fa.flash_attn_with_kvcache(
                q, k_cache, v_cache, cache_seqlens=meta.seq_lens, page_table=meta.block_tables,
                causal=True, **ragged_q,
            )  # fmt: skip
        out = fa.flash_attn_varlen_func(
            q, k_cache, v_cache, seqused_k=meta.seq_lens, page_table=meta.block_tables,
            causal=True, **ragged_q,
        )  # fmt: skip
        return out[0] if isinstance(out, tuple) else out


def _fa2_blocks(ctx: KernelContext) -> Rejection | None:
    if ctx.block_size % 256:
        return Rejection(
            Reason.BLOCK_SIZE,
            f"FA2 paged KV needs a block size multiple of 256, got {ctx.block_size}",
        )
    return None


def _fa4_arch(ctx: KernelContext) -> Rejection | None:
    if ctx.sm >= 120:  # consumer Blackwell: FA4 asserts arch // 10 in [9, 10, 11]
        return Rejection(Reason.GENERATION, f"FA4 supports sm_90-sm_11x, not sm_{ctx.sm}")
    return None


def _factory(version: int):
    def build(ctx: KernelContext) -> FlashAttnPaged:
        return FlashAttnPaged(ctx, version)

    return build


_FP = frozenset({"float16", "bfloat16"})
_HEADS_ANY = frozenset(range(8, 257, 8))  # head_dim <= 256, multiple of 8
_HEADS_FA4 = frozenset({64, 96, 128})
DOC_FA2 = (
    "flash_attn_interface.flash_attn_with_kvcache: paged KV page_block_size multiple of 256; "
    "README: SM 80+, fp16/bf16, head_dim <= 256"
)
DOC_FA3 = "README: H100/H800 (SM 90); hopper/flash_attn_interface.py: any page size, hdim <= 256"
DOC_FA4 = "flash_attn/cute/interface.py: hdim 64/96/128, fp16/bf16, paged KV not on SM 9.0"
# Uniform query lengths (decode, verification) take the shape-only path: graph-safe. Ragged
# prefill passes host max_seqlen_*: not graph-safe.
_GRAPH_SAFE = {Op.ATTN_DECODE: True, Op.ATTN_VERIFY: True, Op.ATTN_PREFILL: False}

SPECS: list[KernelSpec] = []
for _op in (Op.ATTN_DECODE, Op.ATTN_PREFILL, Op.ATTN_VERIFY):
    _suffix = _op.value.removeprefix("attention_")
    SPECS += [
        KernelSpec(
            f"flash_attn.fa2_{_suffix}",
            _op,
            "flash_attn",
            priority=80,
            graph_safe=_GRAPH_SAFE[_op],
            dtypes=_FP,
            head_dims=_HEADS_ANY,
            min_sm=80,
            check=_fa2_blocks,
            factory=_factory(2),
            doc=DOC_FA2,
        ),
        KernelSpec(
            f"flash_attn.fa3_{_suffix}",
            _op,
            "flash_attn",
            priority=110,
            graph_safe=_GRAPH_SAFE[_op],
            dtypes=_FP,
            head_dims=_HEADS_ANY,
            min_sm=90,
            generations=frozenset({"hopper"}),
            factory=_factory(3),
            doc=DOC_FA3,
        ),
        KernelSpec(
            f"flash_attn.fa4_{_suffix}",
            _op,
            "flash_attn",
            priority=105,
            graph_safe=_GRAPH_SAFE[_op],
            dtypes=_FP,
            head_dims=_HEADS_FA4,
            min_sm=100,
            generations=frozenset({"blackwell"}),
            check=_fa4_arch,
            factory=_factory(4),
            doc=DOC_FA4,
        ),
    ]
