"""Triton paged decode attention (one query token per sequence), split-KV (flash-decoding).

Design:

* GQA-aware: one program handles *all* query heads of one KV head, so each K/V tile is read
  from memory once per group. The group's ``G = Hq / Hkv`` heads form the M side of a
  ``tl.dot``, padded to ``BLOCK_H = max(16, next_pow2(G))`` rows (``tl.dot`` needs M >= 16;
  padded rows load zeros and are never stored).
* Split-KV: kernel 1 runs on the grid ``(S, Hkv, num_splits)``. Split ``j`` of sequence ``s``
  covers positions ``[j * L, min((j + 1) * L, seq_len))`` with
  ``L = round_up(cdiv(seq_len, num_splits), BLOCK_N)`` (split length adapts to each sequence on
  the device; short sequences leave trailing splits empty). It walks its range in tiles of
  ``BLOCK_N`` tokens, gathering each token's page through the block table (any page size), with
  an online softmax in fp32 (base-2 exponentials, scale folded into ``log2(e)``), and writes the
  partial ``(max, sum, unnormalised acc)``. The splits are merged with log-sum-exp weights by
  the **last split to finish** of each ``(s, kv_head)``: every split bumps a per-(s, kv_head)
  counter (acq_rel atomic, after a CTA barrier); the one that sees ``num_splits - 1`` reads all
  partials back (bypassing L1) and writes the group's output, then resets the counter to 0, so
  the zeroed counters persist across launches and graph replays. One launch per layer instead
  of two. The merge reads every partial from memory in a fixed order, so the result does not
  depend on which split came last. Where no counters are available (more than
  ``MAX_MERGE_COUNTERS`` (s, kv_head) pairs, or a first use inside graph capture) a separate
  merge kernel on the grid ``(S, Hq)`` does the same sums. With ``num_splits == 1`` kernel 1
  normalises and writes the output itself.
* ``num_splits`` comes from a host-side bound on the context length (``max_seq_len_hint``,
  default ``block_tables.shape[1] * block_size``), the batch size and the SM count -- never from
  ``seq_lens``' contents -- and the partial buffers' shapes depend only on it, so a captured CUDA
  graph replays correctly for any lengths within the bound. Eager calls with the same shapes and
  hint launch identical kernels and give bitwise-identical results.
* Rows with ``seq_len == 0`` (padding) give zeros. Masked loads never touch K/V past a
  sequence's length (unused slots may hold NaN garbage).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["choose_num_splits", "triton_paged_decode"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in merging than it gains
MAX_SPLITS = 32
MAX_MERGE_COUNTERS = 1 << 16  # (sequence, kv head) pairs the fused merge covers (256 KiB)


# --------------------------------------------------------------------------- shared host helpers


def check_attention_args(query: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int]:
    """Validate ``query [T, Hq, D]`` against ``kv_cache [N, 2, bs, Hkv, D]``.

    Returns ``(num_q_heads, num_kv_heads, head_dim)``.
    """
    if query.dim() != 3:
        raise ValueError(f"query must be [T, Hq, D], got {tuple(query.shape)}")
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [N, 2, bs, Hkv, D], got {tuple(kv_cache.shape)}")
    _, num_q_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"head_dim mismatch: query {head_dim}, kv_cache {kv_cache.shape[4]}")
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    # tl.dot needs power-of-two tiles with every dimension >= 16.
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, (
        f"head_dim must be a power of two >= 16, got {head_dim}"
    )
    if query.dtype not in SUPPORTED_DTYPES or kv_cache.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtypes: query {query.dtype}, kv_cache {kv_cache.dtype}")
    if query.device != kv_cache.device:
        raise ValueError(f"query on {query.device}, kv_cache on {kv_cache.device}")
    return num_q_heads, num_kv_heads, head_dim


def dot_precision(kv_dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 products for an fp32 cache (TF32 would
    lose about three decimal digits); ``tf32`` (Triton's default, unused for 16-bit inputs)
    otherwise."""
    return "ieee" if kv_dtype == torch.float32 else "tf32"


def dot_in_fp32(device: torch.device) -> bool:
    """Whether ``tl.dot`` operands are upcast to fp32 first. Off CUDA the kernels run under
    Triton's interpreter, whose ``tl.dot`` multiplies the raw uint16 bit patterns of bfloat16
    operands; upcasting the (already rounded) 16-bit values gives the exact products a GPU
    tensor core accumulates in fp32, so CPU results mean the same as GPU ones."""
    return device.type != "cuda"


@triton.jit
def mma(a, b, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``a @ b`` with fp32 accumulation (see :func:`dot_in_fp32`)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a nominal 8 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, sms: int) -> int:
    """Splits per sequence: enough programs for about two waves over the GPU, but no split
    shorter than ``MIN_SPLIT_TOKENS`` of the longest possible context. Host ints only."""
    by_len = triton.cdiv(max(max_seq_len, 0), MIN_SPLIT_TOKENS)
    by_occupancy = triton.cdiv(2 * sms, max(num_seqs * num_kv_heads, 1))
    return max(1, min(by_len, by_occupancy, MAX_SPLITS))


# --------------------------------------------------------------------------- kernels


@triton.jit
def _decode_split_kernel(
    q_ptr,
    kv_ptr,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    count_ptr,
    scale_log2,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    stride_cd,
    stride_bts,
    stride_btn,
    stride_os,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq64 = seq.to(tl.int64)

    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_H)
    head_mask = offs_g < GROUP
    q_heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    kv_ty = kv_ptr.dtype.element_ty
    q = tl.load(
        q_ptr + seq64 * stride_qs + q_heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=head_mask[:, None],
        other=0.0,
    ).to(kv_ty)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + seq64 * stride_bts
    head_off = kv_head.to(tl.int64) * stride_ch
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        page = tl.load(bt_row + (pos // PAGE_SIZE) * stride_btn, mask=valid, other=0).to(tl.int64)
        tok = page * stride_cb + (pos % PAGE_SIZE).to(tl.int64) * stride_ct + head_off
        ptrs = kv_ptr + tok[:, None] + offs_d[None, :] * stride_cd
        k = tl.load(ptrs, mask=valid[:, None], other=0.0)
        s = mma(q, tl.trans(k), DOT_F32, DOT_PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(ptrs + stride_ckv, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(kv_ty), v, DOT_F32, DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty rows: acc == 0 -> zeros
        o_ptrs = (
            out_ptr + seq64 * stride_os + q_heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        )
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
    else:
        # Partials: m/l [S, Hq, NUM_SPLITS], acc [S, Hq, NUM_SPLITS, D], contiguous.
        row = (seq64 * (GROUP * tl.num_programs(1)) + q_heads) * NUM_SPLITS + split
        tl.store(m_ptr + row, m_i, mask=head_mask)
        tl.store(l_ptr + row, l_i, mask=head_mask)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=head_mask[:, None])
        if FUSED_MERGE:
            tl.debug_barrier()  # every thread's partial stores precede the release below
            counter = count_ptr + seq64 * tl.num_programs(1) + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
                _merge_group(m_ptr, l_ptr, acc_ptr, out_ptr, seq64, q_heads, head_mask,
                             GROUP * tl.num_programs(1), stride_os, stride_oh, stride_od,
                             HEAD_DIM, NUM_SPLITS, BLOCK_SPLITS)  # fmt: skip
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next


@triton.jit
def _merge_group(
    m_ptr, l_ptr, acc_ptr, out_ptr, seq64, q_heads, head_mask, num_q_heads,
    stride_os, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):  # fmt: skip
    """Merge the ``NUM_SPLITS`` partials of the heads ``q_heads`` ``[BLOCK_H]`` of one
    sequence into the output (called by the last split; loads bypass L1: ``.cg``)."""
    offs_j = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = head_mask[:, None] & (offs_j[None, :] < NUM_SPLITS)  # [BLOCK_H, BLOCK_SPLITS]
    rows = (seq64 * num_q_heads + q_heads[:, None]) * NUM_SPLITS + offs_j[None, :]
    m = tl.load(m_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
    l = tl.load(l_ptr + rows, mask=mask, other=0.0, cache_modifier=".cg")  # noqa: E741
    acc = tl.load(
        acc_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
        mask=mask[:, :, None], other=0.0, cache_modifier=".cg",
    )  # fmt: skip
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (seq_len 0)
    w = tl.exp2(m - m_max[:, None])  # empty splits: exp2(-inf) == 0
    denom = tl.sum(w * l, 1)
    out = tl.sum(w[:, :, None] * acc, 1) / tl.where(denom > 0, denom, 1.0)[:, None]
    o_ptrs = (
        out_ptr + seq64 * stride_os + q_heads[:, None] * stride_oh + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])


@triton.jit
def _decode_merge_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    stride_os,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_j = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    j_mask = offs_j < NUM_SPLITS
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + offs_j
    m = tl.load(m_ptr + row, mask=j_mask, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=j_mask, other=0.0)  # noqa: E741
    acc = tl.load(
        acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=j_mask[:, None], other=0.0
    )
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (seq_len 0)
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) == 0
    denom = tl.sum(w * l, 0)
    num = tl.sum(w[:, None] * acc, 0)
    out = num / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + offs_d * stride_od,
        out.to(out_ptr.dtype.element_ty),
    )


# --------------------------------------------------------------------------- entry point


_merge_counters: dict[torch.device, torch.Tensor] = {}


def _counter_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:N" share a buffer
        return torch.device("cuda", torch.cuda.current_device())
    return device


def merge_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The device's zeroed int32 ``[MAX_MERGE_COUNTERS]`` counters of the fused split merge
    (allocated once, outside graph capture; the kernel leaves them zeroed), or None when
    ``needed`` exceeds them or they would first be allocated inside a capture (that graph then
    keeps the separate merge: warm up eagerly before capturing, as the runtime's graph runner
    does, so graphs and eager calls sum in the same order). Launches that share the counters
    must not run concurrently (on two streams at once); the runtime launches its decode steps
    on one stream. Pass ``fused_merge=False`` where that does not hold."""
    device = _counter_key(device)
    counters = _merge_counters.get(device)
    if counters is None:
        if needed > MAX_MERGE_COUNTERS or (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        ):
            return None
        counters = _merge_counters[device] = torch.zeros(
            MAX_MERGE_COUNTERS, dtype=torch.int32, device=device
        )
    return counters if needed <= counters.numel() else None


def reset_merge_counters(device: torch.device) -> None:
    """Zero the device's merge counters (after a launch was interrupted, or after concurrent
    launches shared them); not inside graph capture."""
    counters = _merge_counters.get(_counter_key(device))
    if counters is not None:
        counters.zero_()


def _block_n(head_dim: int, elem_size: int) -> int:
    return 32 if head_dim * elem_size > 256 else 64


def triton_paged_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    max_seq_len_hint: int | None = None,
    fused_merge: bool = True,
) -> torch.Tensor:
    """Decode attention over the paged cache; same contract as ``torch_ref.paged_decode``.

    Args:
        query: ``[S, Hq, D]`` (fp16/bf16/fp32), one token per sequence at position
            ``seq_lens[s] - 1``; any strides. ``D`` a power of two >= 16.
        kv_cache: ``[N, 2, bs, Hkv, D]`` one layer's cache (any strides, any page size);
            ``Hq % Hkv == 0``. Query is cast to the cache dtype for the dot products.
        block_tables: int32 ``[S, max_blocks]`` on the device; entries past a sequence's last
            block are never read.
        seq_lens: int32 ``[S]`` on the device; 0 marks a padding row (output zeros). Must be
            ``<= max_seq_len_hint`` (if given) and ``<= max_blocks * bs``.
        scale: softmax scale, default ``D ** -0.5``.
        num_splits: split-KV factor; default chosen by :func:`choose_num_splits`.
        max_seq_len_hint: host-side upper bound on ``seq_lens`` used to choose ``num_splits``;
            default ``max_blocks * bs`` (shape-derived, so graph capture and eager agree).
        fused_merge: merge the splits in the last split's program (one launch; see the module
            docstring); False, or no counters available: a separate merge kernel.

    Returns:
        ``[S, Hq, D]`` in ``query.dtype``. Never reads device values on the host (CUDA-graph
        safe): the launch depends only on shapes, ``num_splits`` and the hint.
    """
    num_q_heads, num_kv_heads, head_dim = check_attention_args(query, kv_cache)
    num_seqs = query.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks]")
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be [{num_seqs}]")
    if scale is None:
        scale = head_dim**-0.5
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    page_size = kv_cache.shape[2]
    if num_splits is None:
        bound = block_tables.shape[1] * page_size if max_seq_len_hint is None else max_seq_len_hint
        num_splits = choose_num_splits(num_seqs, num_kv_heads, bound, num_sms(query.device))
    num_splits = max(1, int(num_splits))
    group = num_q_heads // num_kv_heads
    block_n = _block_n(head_dim, kv_cache.element_size())

    counters = None
    if num_splits > 1 and fused_merge:
        counters = merge_counters(query.device, num_seqs * num_kv_heads)
    if num_splits == 1:
        m_buf = l_buf = acc_buf = out  # unused by the single-split kernel
    else:
        f32 = dict(dtype=torch.float32, device=query.device)
        m_buf = torch.empty(num_seqs, num_q_heads, num_splits, **f32)
        l_buf = torch.empty(num_seqs, num_q_heads, num_splits, **f32)
        acc_buf = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, **f32)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        kv_cache,
        block_tables,
        seq_lens,
        out,
        m_buf,
        l_buf,
        acc_buf,
        out if counters is None else counters,
        float(scale) * LOG2E,
        *query.stride(),
        *kv_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(kv_cache.dtype),
        DOT_F32=dot_in_fp32(query.device),
        FUSED_MERGE=counters is not None,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        num_warps=4,
    )
    if num_splits > 1 and counters is None:
        _decode_merge_kernel[(num_seqs, num_q_heads)](
            m_buf,
            l_buf,
            acc_buf,
            out,
            *out.stride(),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out
