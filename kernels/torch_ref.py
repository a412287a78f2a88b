"""Plain-torch reference kernels: the oracle that fast kernels are tested against.

Correctness over speed. Every function runs on any device torch supports (CPU or CUDA) and
computes attention in ``compute_dtype`` (float32 by default) whatever the storage dtype.

KV cache layout per layer (see ``layerzero_serve.kernels.block_layout``):
``kv_cache[num_blocks, 2, block_size, num_kv_heads, head_dim]`` with K at index 0 of dim 1 and V
at index 1. A slot is ``block_id * block_size + offset``; slot ``-1`` (any negative slot) means
"write nothing" (padding rows).

GQA convention: query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``.

CUDA-graph safety (no host sync, no data-dependent shapes, device work only):

* :func:`write_kv` -- safe.
* :func:`paged_decode` -- safe (shapes come from the block table's width, never its contents).
* :func:`paged_attention` -- NOT safe: it loops over sequences using the host lists in the
  metadata, so a captured graph would bake in one batch's shapes.
* :func:`dense_causal_attention` -- safe for fixed shapes (nothing reads device values on the
  host), but it is meant for tests, not for the serving path.
* :func:`rejection_sample` (lossless speculative verification, the rule every
  ``Op.REJECTION_SAMPLING`` kernel follows) and :class:`TorchRejectionSampler`, its catalog
  adapter -- safe: no host sync, shapes fixed by the inputs.
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.rejection_api import check_rejection_inputs, emitted_ids
from layerzero_serve.kernels.spec import KernelContext

__all__ = [
    "TorchRejectionSampler",
    "dense_causal_attention",
    "paged_attention",
    "paged_decode",
    "rejection_sample",
    "write_kv",
]


def _check_heads(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of "
            f"num_kv_heads ({num_kv_heads})"
        )
    return num_q_heads // num_kv_heads


def _check_cache(kv_cache: torch.Tensor, head_dim: int) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(
            "kv_cache must be [num_blocks, 2, block_size, num_kv_heads, head_dim], "
            f"got {tuple(kv_cache.shape)}"
        )
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"head_dim mismatch: query {head_dim}, kv_cache {kv_cache.shape[4]}")


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter this step's K/V into the paged cache, in place.

    Args:
        key: ``[T, Hkv, D]``, any floating dtype (cast to ``kv_cache.dtype``), on the cache's
            device.
        value: ``[T, Hkv, D]``, same dtype/device as ``key``.
        kv_cache: ``[N, 2, bs, Hkv, D]`` one layer's cache, modified in place. Need not be
            contiguous.
        slot_mapping: int32 (or int64) ``[T]`` on the cache's device. Token ``t`` goes to block
            ``slot // bs``, offset ``slot % bs``. Negative slots write nothing. Valid slots must
            be distinct (the scheduler never maps two tokens to one slot).

    CUDA-graph safe: no host sync and no data-dependent shapes. Padding rows are redirected to
    the slot of one valid row of the same call and carry that row's K/V, so every duplicate
    write stores bit-identical data and the cache ends exactly as if padding rows were skipped.
    When no row is valid, all rows rewrite slot 0 with the value already there (a bitwise
    no-op). No slot outside the valid ones ever changes.
    """
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key/value must both be [T, Hkv, D], got {key.shape} / {value.shape}")
    num_tokens, num_kv_heads, head_dim = key.shape
    _check_cache(kv_cache, head_dim)
    if kv_cache.shape[3] != num_kv_heads:
        raise ValueError(f"num_kv_heads mismatch: key {num_kv_heads}, cache {kv_cache.shape[3]}")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    block_size = kv_cache.shape[2]
    device = kv_cache.device

    slots = slot_mapping.to(device=device, dtype=torch.long)
    valid = slots >= 0
    # First valid row (argmax returns the first maximum); row 0 when none is valid.
    donor = torch.argmax(valid.to(torch.int32))
    rows = torch.arange(num_tokens, device=device)
    src = torch.where(valid, rows, donor)  # padding rows borrow the donor row
    src_valid = valid[src]  # False everywhere only when no row is valid
    slot = slots[src].clamp_min(0)
    blk = slot // block_size
    off = slot % block_size

    k_new = key[src].to(kv_cache.dtype)
    v_new = value[src].to(kv_cache.dtype)
    keep = ~src_valid[:, None, None]
    k_new = torch.where(keep, kv_cache[blk, 0, off], k_new)
    v_new = torch.where(keep, kv_cache[blk, 1, off], v_new)

    kv_idx = torch.cat([torch.zeros_like(blk), torch.ones_like(blk)])
    kv_cache.index_put_(
        (torch.cat([blk, blk]), kv_idx, torch.cat([off, off])),
        torch.cat([k_new, v_new]),
    )


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """Masked softmax attention for a batch of independent problems.

    q ``[B, Lq, Hq, D]``, k/v ``[B, Lk, Hkv, D]``, allowed bool ``[B, Lq, Lk]`` (True = attend).
    Returns ``[B, Lq, Hq, D]`` in ``compute_dtype``; query rows with no allowed key give zeros
    and masked-out K/V entries never reach the result (even NaN garbage).
    """
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    blocked = ~allowed[:, None, None]  # [B, 1, 1, Lq, Lk]
    # [B, Hkv, G, Lq, D]: query head h = kv_head * G + g reads kv head h // G.
    qc = q.to(compute_dtype).reshape(b, lq, hkv, group, d).permute(0, 2, 3, 1, 4)
    kt = k.to(compute_dtype).permute(0, 2, 3, 1)[:, :, None]  # [B, Hkv, 1, D, Lk]
    # Zero V where no query may look, so 0 * NaN garbage cannot leak through the matmul.
    key_used = allowed.any(dim=1)  # [B, Lk]
    vc = v.to(compute_dtype).masked_fill(~key_used[:, :, None, None], 0)
    vc = vc.permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, Lk, D]
    scores = torch.matmul(qc, kt).mul_(scale)  # [B, Hkv, G, Lq, Lk]
    scores.masked_fill_(blocked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vc)  # [B, Hkv, G, Lq, D]; rows with no allowed key are NaN
    row_empty = ~allowed.any(dim=2)  # [B, Lq]
    out = out.permute(0, 3, 1, 2, 4).reshape(b, lq, hq, d)
    return out.masked_fill(row_empty[:, :, None, None], 0.0)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention over the paged cache for a mixed batch (decode, prefill, extend, chunk).

    Args:
        query: ``[T, Hq, D]`` on the cache's device, packed per ``meta.query_start_loc``
            (sequence ``i`` owns rows ``qsl[i]:qsl[i+1]``); ``T >= qsl[-1]``, rows past
            ``qsl[-1]`` are padding.
        kv_cache: ``[N, 2, bs, Hkv, D]`` one layer's cache, already holding this step's K/V
            (call :func:`write_kv` first). ``Hq`` must be a multiple of ``Hkv``.
        meta: read fields: ``block_size``, ``block_tables`` (int32 ``[S, max_blocks]``, on the
            cache's device), ``query_start_loc_cpu`` and ``seq_lens_cpu`` (host lists).
        scale: softmax scale, default ``D ** -0.5``.
        compute_dtype: dtype of the matmuls and softmax (float32 default).

    Returns:
        ``[T, Hq, D]`` in ``query.dtype`` on ``query.device``. Query token ``j`` of sequence
        ``i`` sits at position ``seq_lens[i] - q_len_i + j`` and attends to KV positions
        ``0 ..`` that position. Padding rows are zeros.

    NOT CUDA-graph safe: loops over sequences on the host (vectorised within each one).
    """
    if query.dim() != 3:
        raise ValueError(f"query must be [T, Hq, D], got {tuple(query.shape)}")
    num_tokens, num_q_heads, head_dim = query.shape
    _check_cache(kv_cache, head_dim)
    num_kv_heads = kv_cache.shape[3]
    _check_heads(num_q_heads, num_kv_heads)
    block_size = kv_cache.shape[2]
    if meta.block_size != block_size:
        raise ValueError(f"meta.block_size {meta.block_size} != cache block size {block_size}")
    qsl = meta.query_start_loc_cpu
    seq_lens = meta.seq_lens_cpu
    if len(qsl) != len(seq_lens) + 1:
        raise ValueError("query_start_loc_cpu must have len(seq_lens_cpu) + 1 entries")
    if qsl and qsl[-1] > num_tokens:
        raise ValueError(f"query_start_loc ends at {qsl[-1]} but query has {num_tokens} rows")
    if scale is None:
        scale = head_dim**-0.5

    out = torch.zeros_like(query)
    block_tables = meta.block_tables.to(device=kv_cache.device, dtype=torch.long)
    for i, kv_len in enumerate(seq_lens):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if q_len > kv_len:
            raise ValueError(f"sequence {i}: query length {q_len} > seq_len {kv_len}")
        num_blocks = -(-kv_len // block_size)
        blocks = block_tables[i, :num_blocks]
        kv = kv_cache[blocks]  # [nb, 2, bs, Hkv, D]
        k = kv[:, 0].reshape(num_blocks * block_size, num_kv_heads, head_dim)[:kv_len]
        v = kv[:, 1].reshape(num_blocks * block_size, num_kv_heads, head_dim)[:kv_len]
        q_pos = torch.arange(kv_len - q_len, kv_len, device=kv_cache.device)
        k_pos = torch.arange(kv_len, device=kv_cache.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        o = _attend(query[start:end][None], k[None], v[None], allowed[None], scale, compute_dtype)
        out[start:end] = o[0].to(out.dtype)
    return out


def paged_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode-only paged attention, vectorised over sequences (no Python loop).

    Args:
        query: ``[S, Hq, D]``, one token per sequence, at position ``seq_lens[s] - 1``.
        kv_cache: ``[N, 2, bs, Hkv, D]`` one layer's cache on the query's device.
        block_tables: int32 ``[S, max_blocks]`` block ids on the same device; entries past a
            sequence's last block are padding (any id in ``[0, N)``, 0 by convention; negative
            ids are clamped to 0) and never influence the result.
        seq_lens: int32 ``[S]`` on the same device, KV length including this token;
            ``seq_lens <= max_blocks * bs``. Rows with ``seq_len == 0`` are padding and give
            zeros.
        scale: softmax scale, default ``D ** -0.5``.
        compute_dtype: dtype of the matmuls and softmax (float32 default).

    Returns:
        ``[S, Hq, D]`` in ``query.dtype``.

    CUDA-graph safe: every shape comes from ``block_tables.shape``; all of the block table is
    gathered (``S * max_blocks * bs`` KV rows) and positions ``>= seq_len`` masked out.
    """
    if query.dim() != 3:
        raise ValueError(f"query must be [S, Hq, D], got {tuple(query.shape)}")
    num_seqs, num_q_heads, head_dim = query.shape
    _check_cache(kv_cache, head_dim)
    num_kv_heads = kv_cache.shape[3]
    _check_heads(num_q_heads, num_kv_heads)
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks]")
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must be [{num_seqs}]")
    if scale is None:
        scale = head_dim**-0.5
    block_size = kv_cache.shape[2]
    max_blocks = block_tables.shape[1]
    max_len = max_blocks * block_size

    blocks = block_tables.to(torch.long).clamp_min(0)
    kv = kv_cache[blocks]  # [S, MB, 2, bs, Hkv, D]
    k = kv[:, :, 0].reshape(num_seqs, max_len, num_kv_heads, head_dim)
    v = kv[:, :, 1].reshape(num_seqs, max_len, num_kv_heads, head_dim)
    k_pos = torch.arange(max_len, device=kv_cache.device)
    allowed = (k_pos[None, :] < seq_lens.to(torch.long)[:, None])[:, None, :]  # [S, 1, L]
    out = _attend(query[:, None], k, v, allowed, scale, compute_dtype)  # [S, 1, Hq, D]
    return out[:, 0].to(query.dtype)


def dense_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Causal attention for one contiguous sequence (no cache), for tests of model code.

    Args:
        query: ``[Lq, Hq, D]``.
        key: ``[Lk, Hkv, D]`` with ``Lk >= Lq`` and ``Hq`` a multiple of ``Hkv``.
        value: ``[Lk, Hkv, D]``.
        scale: softmax scale, default ``D ** -0.5``.
        compute_dtype: dtype of the matmuls and softmax (float32 default).

    Returns:
        ``[Lq, Hq, D]`` in ``query.dtype``. The queries are the last ``Lq`` positions
        (bottom-right aligned): query ``j`` sits at ``Lk - Lq + j`` and sees keys ``0 ..`` that
        position; with ``Lq == Lk`` this is the usual lower-triangular mask.

    CUDA-graph safe for fixed shapes.
    """
    if query.dim() != 3 or key.dim() != 3 or key.shape != value.shape:
        raise ValueError("query must be [Lq, Hq, D], key/value [Lk, Hkv, D]")
    q_len, num_q_heads, head_dim = query.shape
    kv_len, num_kv_heads, k_dim = key.shape
    if k_dim != head_dim:
        raise ValueError(f"head_dim mismatch: query {head_dim}, key {k_dim}")
    if kv_len < q_len:
        raise ValueError(f"key length {kv_len} < query length {q_len}")
    _check_heads(num_q_heads, num_kv_heads)
    if scale is None:
        scale = head_dim**-0.5
    q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
    k_pos = torch.arange(kv_len, device=query.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    out = _attend(query[None], key[None], value[None], allowed[None], scale, compute_dtype)
    return out[0].to(query.dtype)


# ---- speculative verification (Op.REJECTION_SAMPLING) ---------------------------------------
def rejection_sample(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    num_drafts: torch.Tensor,
    is_greedy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``k`` draft tokens per request against the target model's distributions in one
    batched, host-sync-free pass: the torch reference of lossless speculative sampling (the rule,
    which every ``Op.REJECTION_SAMPLING`` kernel follows, is in
    :mod:`layerzero_serve.kernels.rejection_api`).

    Args:
        draft_ids: int64 ``[B, k]`` proposed ids (positions past ``num_drafts`` are ignored; an
            id outside ``[0, V)`` is rejected and its position draws from the target).
        draft_probs: float32 ``[B, k, V]`` draft distributions ``q`` (processed like the
            request's sampling), or None for a one-hot ``q`` at each draft id.
        target_probs: float32 ``[B, k+1, V]`` target distributions ``p`` (processed the same
            way); position ``j`` is the distribution of the token after draft ``j-1``.
        uniforms: float32 ``[B, k]`` in [0, 1), one per draft position.
        noise: float32 ``[B, V]``, ``1 / Exp(1)`` samples, positive and finite.
        num_drafts: int32 ``[B]`` drafts per row (clamped to ``[0, k]``).
        is_greedy: bool ``[B]`` rows verified greedily, or None (no greedy row).

    Returns:
        ``(output_ids, num_accepted)``: int64 ``[B, k+1]`` accepted drafts then the recovered or
        bonus token, padded with -1; int32 ``[B]`` accepted drafts per row. All tensors on
        ``target_probs.device``.

    CUDA graphs: safe to capture: no host sync, shapes fixed by the inputs.
    """
    b, k, v = check_rejection_inputs(
        draft_ids, draft_probs, target_probs, uniforms, noise, num_drafts, is_greedy
    )
    device = target_probs.device
    rows = torch.arange(b, device=device)
    pos = torch.arange(k, device=device)
    n = num_drafts.to(torch.long).clamp(0, k)
    in_vocab = (draft_ids >= 0) & (draft_ids < v)
    valid = in_vocab & (pos < n[:, None])
    idx = draft_ids.clamp(0, v - 1)  # safe to gather; `valid` forces rejection where clamped

    p_x = target_probs[:, :k].gather(2, idx[..., None]).squeeze(2)
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
    else:
        q_x = draft_probs.gather(2, idx[..., None]).squeeze(2)
    accept = uniforms * q_x < p_x
    if is_greedy is not None:
        greedy_accept = idx == target_probs[:, :k].argmax(dim=2)
        accept = torch.where(is_greedy[:, None], greedy_accept, accept)
    accept &= valid
    # Length of the accepted prefix: drafts after the first rejection do not count.
    num_acc = accept.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)

    # One draw per row at position a = num_acc: the residual after a rejection, else p (bonus).
    a = num_acc.to(torch.long)
    rejected = a < n
    p_a = target_probs[rows, a]
    a_draft = a.clamp(max=max(k - 1, 0))
    if k == 0:
        q_a = torch.zeros_like(p_a)
    elif draft_probs is None:  # one-hot at the rejected id (when it was a real id)
        hit = (rejected & in_vocab[rows, a_draft]).to(p_a.dtype)[:, None]
        q_a = torch.zeros_like(p_a).scatter_(1, idx[rows, a_draft][:, None], hit)
    else:
        # where, not a product: padding rows of draft_probs may hold anything (inf, NaN). An
        # out-of-vocabulary draft was never drawn from q: its rejection is certain and says
        # nothing about q, so the token there follows p itself (residual against q = 0).
        use_q = rejected & in_vocab[rows, a_draft]
        q_a = torch.where(use_q[:, None], draft_probs[rows, a_draft], 0.0)
    residual = (p_a - q_a).clamp_min(0.0)
    use_residual = residual.amax(dim=1) > 0
    weights = torch.where(use_residual[:, None], residual, p_a)
    token = (weights * noise).argmax(dim=1)
    if is_greedy is not None:
        token = torch.where(is_greedy, p_a.argmax(dim=1), token)

    return emitted_ids(draft_ids, a, token), num_acc


class TorchRejectionSampler:
    """Kernel-catalog adapter of :func:`rejection_sample` (``run`` and ``__call__``); its spec,
    ``torch.rejection_sampling``, is in the catalog. CUDA graphs: as :func:`rejection_sample`."""

    name = "torch.rejection_sampling"

    def __init__(self, ctx: KernelContext | None = None) -> None:
        self.ctx = ctx

    # the reference signature, as is (no host work added)
    run = staticmethod(rejection_sample)
    __call__ = run
