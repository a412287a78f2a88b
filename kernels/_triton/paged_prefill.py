"""Triton causal paged attention for prefill, extend (prefix hit), chunked prefill, mixed and
verification batches.

Sequence ``i`` owns query rows ``query_start_loc[i] : query_start_loc[i + 1]`` (``q_len_i``
tokens) at positions ``seq_lens[i] - q_len_i .. seq_lens[i] - 1``; each attends to every cached
position up to its own (prefix, earlier chunks, then its own chunk causally). The chunk's K/V
must already be in the cache (``write_kv`` runs first); all K/V is read through the block table.

Design:

* Grid ``(cdiv(max_query_len, BLOCK_M), num_seqs, Hq)``: one program per block of ``BLOCK_M``
  query tokens of one sequence and one query head (GQA: query head ``h`` reads KV head
  ``h // G``; the ``G`` programs sharing a KV head read the same tiles, mostly from L2).
  ``query_start_loc`` and ``seq_lens`` are read on the device; programs past their sequence's
  query length exit at once. Only the grid's first dimension comes from the host
  (``max_query_len``), as an upper bound: a launch sized for a larger bound is still correct.
* Each program walks KV tiles of ``BLOCK_N`` positions, gathering each position's page through
  the block table (any page size), with an fp32 online softmax (base-2 exponentials). Tiles
  entirely before the block's first query position need no mask (first loop); the remaining
  tiles up to the block's last query position apply the causal mask (second loop); tiles past
  it are never read.
* Padding query rows (past ``query_start_loc[-1]``) are zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from layerzero_serve.kernels._triton.paged_decode import (
    LOG2E,
    check_attention_args,
    dot_in_fp32,
    dot_precision,
    mma,
)
from layerzero_serve.kernels.metadata import AttentionMetadata

__all__ = ["triton_paged_prefill"]


@triton.jit
def _tile(
    q,
    m_i,
    l_i,
    acc,
    kv_ptr,
    bt_row,
    head_off,
    n0,
    q_pos,
    kv_len,
    scale_log2,
    stride_btn,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_cd,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """One online-softmax step over KV positions ``n0 .. n0 + BLOCK_N - 1``."""
    pos = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = pos < kv_len
    page = tl.load(bt_row + (pos // PAGE_SIZE) * stride_btn, mask=valid, other=0).to(tl.int64)
    tok = page * stride_cb + (pos % PAGE_SIZE).to(tl.int64) * stride_ct + head_off
    ptrs = kv_ptr + tok[:, None] + offs_d[None, :] * stride_cd
    k = tl.load(ptrs, mask=valid[:, None], other=0.0)
    s = mma(q, tl.trans(k), DOT_F32, DOT_PRECISION) * scale_log2
    if CAUSAL_MASK:
        allowed = (pos[None, :] <= q_pos[:, None]) & valid[None, :]
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(ptrs + stride_ckv, mask=valid[:, None], other=0.0)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_F32, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    seq_lens_ptr,
    qsl_ptr,
    out_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    stride_cd,
    stride_bts,
    stride_btn,
    stride_ot,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    m_block = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)

    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    ctx_len = kv_len - q_len  # positions cached before this step's queries

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (q_start + offs_m).to(tl.int64)
    kv_ty = kv_ptr.dtype.element_ty
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
        mask=m_mask[:, None],
        other=0.0,
    ).to(kv_ty)
    q_pos = ctx_len + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    head_off = (head // GROUP).to(tl.int64) * stride_ch

    # Every row of the block sees all positions before its first query position.
    first_q = ctx_len + m_block * BLOCK_M
    full_end = (first_q // BLOCK_N) * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _tile(
            q, m_i, l_i, acc, kv_ptr, bt_row, head_off, n0, q_pos, kv_len, scale_log2,
            stride_btn, stride_cb, stride_ckv, stride_ct, stride_cd,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, False, DOT_PRECISION, DOT_F32,
        )  # fmt: skip
    # The diagonal: tiles up to the block's last query position, causally masked.
    last_end = tl.minimum(kv_len, first_q + BLOCK_M)
    for n0 in range(full_end, last_end, BLOCK_N):
        m_i, l_i, acc = _tile(
            q, m_i, l_i, acc, kv_ptr, bt_row, head_off, n0, q_pos, kv_len, scale_log2,
            stride_btn, stride_cb, stride_ckv, stride_ct, stride_cd,
            HEAD_DIM, PAGE_SIZE, BLOCK_N, True, DOT_PRECISION, DOT_F32,
        )  # fmt: skip

    out = acc / l_i[:, None]  # every row sees position 0, so l_i > 0
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


def _tiles(head_dim: int, elem_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_stages): smaller tiles for wide rows, to fit shared memory."""
    if head_dim * elem_size <= 256:
        return 64, 64, 3
    return 32, 32, 2


def triton_paged_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Causal attention over the paged cache for a mixed batch; same contract as
    ``torch_ref.paged_attention``.

    Args:
        query: ``[T, Hq, D]`` (fp16/bf16/fp32) packed per ``meta.query_start_loc``; rows past
            ``query_start_loc[-1]`` are padding. ``D`` a power of two >= 16.
        kv_cache: ``[N, 2, bs, Hkv, D]``, already holding this step's K/V; any strides.
        meta: device fields read: ``query_start_loc``, ``seq_lens``, ``block_tables``; host
            fields: ``num_seqs``, ``max_query_len`` (grid size). ``q_len <= seq_len`` per row.
        scale: softmax scale, default ``D ** -0.5``.
        max_query_len: grid bound overriding ``meta.max_query_len`` (for a CUDA graph that must
            cover every replay, e.g. ``k + 1`` tokens per row in verification).

    Returns:
        ``[T, Hq, D]`` in ``query.dtype``; padding rows and rows of empty sequences are zeros.
        No host sync: the launch depends only on shapes and ``max_query_len``.
    """
    num_q_heads, num_kv_heads, head_dim = check_attention_args(query, kv_cache)
    page_size = kv_cache.shape[2]
    if meta.block_size != page_size:
        raise ValueError(f"meta.block_size {meta.block_size} != cache block size {page_size}")
    if scale is None:
        scale = head_dim**-0.5
    bound = meta.max_query_len if max_query_len is None else max_query_len
    out = torch.zeros_like(query)
    num_seqs = meta.num_seqs
    if num_seqs == 0 or bound <= 0 or query.shape[0] == 0:
        return out
    block_m, block_n, num_stages = _tiles(head_dim, kv_cache.element_size())
    bt = meta.block_tables
    grid = (triton.cdiv(bound, block_m), num_seqs, num_q_heads)
    _prefill_kernel[grid](
        query,
        kv_cache,
        bt,
        meta.seq_lens,
        meta.query_start_loc,
        out,
        float(scale) * LOG2E,
        *query.stride(),
        *kv_cache.stride(),
        *bt.stride(),
        *out.stride(),
        GROUP=num_q_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(kv_cache.dtype),
        DOT_F32=dot_in_fp32(query.device),
        num_warps=4,
        num_stages=num_stages,
    )
    return out
