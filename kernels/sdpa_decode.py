"""Decode attention over the paged cache through torch's fused ``scaled_dot_product_attention``:
the fast path on the CPU, where the reference's separate matmul / mask / softmax / matmul
passes dominated a small model's decode step (3x slower at batch 8 x 112 tokens of context on
one thread).

K and V are gathered per layer as token rows straight from the cache (two ``index_select``
calls of ``[S * max_blocks * block_size]`` rows of ``Hkv * D``; which rows is computed once per
step, :func:`decode_gather`); positions at or past ``seq_len`` are masked out of the scores and
gather the sequence's position 0 instead of the slot's stale contents, so a NaN left in a
reused block never reaches the result (as in the reference). Rows with ``seq_len == 0``
(padding) give zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_gather(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache rows :func:`sdpa_paged_decode` reads, the same for every layer of a step.

    Returns ``(rows, valid)``: int64 ``[S, max_blocks * bs]`` row of each position's K in the
    ``[N * 2 * bs, Hkv * D]`` view of a layer's cache (its V row is ``rows + bs``), and bool
    ``[S, max_blocks * bs]``, True below ``seq_lens``. Past a sequence's end the row is its
    position 0 (finite, and masked out of the scores): stale or NaN contents of a reused block
    never enter the softmax's sums, and no pass over the gathered copy is needed to clean it.
    CUDA-graph safe (shapes from ``block_tables``; no host synchronisation).
    """
    length = block_tables.shape[1] * block_size
    pos = torch.arange(length, device=block_tables.device)
    valid = pos[None, :] < seq_lens.to(torch.long)[:, None]
    pos = torch.where(valid, pos[None, :], 0)
    blocks = block_tables.to(torch.long).clamp_min(0).gather(1, pos // block_size)
    return blocks * (2 * block_size) + pos % block_size, valid


def sdpa_paged_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    gather: tuple[torch.Tensor, torch.Tensor] | None = None,
    has_empty: bool = True,
) -> torch.Tensor:
    """One query token per sequence against its paged K/V.

    Args:
        query: ``[S, Hq, D]``, the token at position ``seq_lens[s] - 1``.
        kv_cache: ``[N, 2, bs, Hkv, D]``, one layer's cache, contiguous (``Hq`` a multiple of
            ``Hkv``).
        block_tables: int32 ``[S, max_blocks]`` block ids (padding entries: any id; negative
            ids read block 0).
        seq_lens: int32 ``[S]`` KV length including this token, ``<= max_blocks * bs``.
        scale: softmax scale, default ``D ** -0.5``.
        gather: :func:`decode_gather` of these tables and lengths, computed once per step
            (else here, per call).
        has_empty: False when the caller knows no ``seq_lens`` entry is 0 (skips zeroing
            padding rows).

    Returns:
        ``[S, Hq, D]`` in ``query.dtype``. An FP8 cache is read as its stored values cast to
        ``query.dtype`` (scales are the caller's: ``AttentionDispatch`` folds them in).

    CUDA-graph safe (shapes come from ``block_tables``; no host synchronisation).
    """
    s, hq, d = query.shape
    n, _, bs, hkv, _ = kv_cache.shape
    rows, valid = decode_gather(block_tables, seq_lens, bs) if gather is None else gather
    length = rows.shape[1]
    flat = kv_cache.reshape(n * 2 * bs, hkv * d)  # a view of the contiguous cache
    # an FP8 cache is cast to the query's dtype (its scales are folded into query and output)
    k = flat.index_select(0, rows.view(-1)).to(query.dtype)
    v = flat.index_select(0, (rows + bs).view(-1)).to(query.dtype)
    k = k.view(s, length, hkv, d).transpose(1, 2)
    v = v.view(s, length, hkv, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query[:, :, None], k, v, attn_mask=valid[:, None, None, :], scale=scale,
        enable_gqa=hq != hkv,
    )  # fmt: skip
    out = out[:, :, 0]
    if has_empty:
        out = out.masked_fill((seq_lens == 0)[:, None, None], 0.0)
    return out.to(query.dtype)
