"""Triton KV-cache write: scatter this step's K/V rows into the paged cache.

Grid ``(T, cdiv(Hkv, BLOCK_H))``: one program per token and block of KV heads; it loads the
token's slot and writes its ``[BLOCK_H, D]`` K and V tiles at ``(slot // bs, slot % bs)``.
Tokens with a negative slot (padding rows) store nothing: every store is masked by
``slot >= 0``, so no cache byte outside the valid slots changes. CUDA-graph safe: no host sync,
every shape comes from tensor shapes, never from their contents.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_write_kv"]


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    stride_cd,
    num_kv_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    hblk = tl.program_id(1)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    # Padding rows (slot -1) store nothing: every store below is masked by slot >= 0.
    safe = tl.maximum(slot, 0)
    heads = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    # The slot test is broadcast through a full-tile comparison: a 0-d boolean in a mask
    # expression is not accepted by every Triton version's interpreter.
    slots_tile = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.int64) + slot
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM) & (slots_tile >= 0)
    k = tl.load(
        key_ptr + tok * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd,
        mask=mask,
    )
    v = tl.load(
        value_ptr + tok * stride_vt + heads[:, None] * stride_vh + dims[None, :] * stride_vd,
        mask=mask,
    )
    dst = (
        cache_ptr
        + (safe // PAGE_SIZE) * stride_cb
        + (safe % PAGE_SIZE) * stride_ct
        + heads[:, None] * stride_ch
        + dims[None, :] * stride_cd
    )
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def triton_write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[T, Hkv, D]`` into ``kv_cache`` ``[N, 2, bs, Hkv, D]`` in place.

    Same contract as ``torch_ref.write_kv``: row ``t`` goes to block ``slot // bs``, offset
    ``slot % bs``; negative slots write nothing; values are cast to the cache dtype (round to
    nearest even, as ``Tensor.to``). Any strides are accepted (a per-layer view of a stacked
    cache, K/V slices of a fused QKV projection). ``slot_mapping`` is int32 or int64 ``[T]``.
    """
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(f"key/value must both be [T, Hkv, D], got {key.shape} / {value.shape}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [N, 2, bs, Hkv, D], got {tuple(kv_cache.shape)}")
    if kv_cache.shape[3] != num_kv_heads or kv_cache.shape[4] != head_dim:
        raise ValueError(
            f"key [.., {num_kv_heads}, {head_dim}] does not match cache {tuple(kv_cache.shape)}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    # About 2K elements per program: all heads of a token for small models, a few for large.
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // block_d)))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _write_kv_kernel[grid](
        key,
        value,
        kv_cache,
        slot_mapping,
        *key.stride(),
        *value.stride(),
        *kv_cache.stride(),
        num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_H=block_h,
        PAGE_SIZE=kv_cache.shape[2],
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )
