"""K/V writes for eager CPU steps: two ``index_copy_`` calls into a flat view of the layer's
cache, instead of the graph-safe reference's padding-donor scheme (about 25 small ops per
layer, several percent of a small model's decode step on one thread). The cache ends
bit-identical to :func:`~layerzero_serve.kernels.torch_ref.write_kv`'s.

Not CUDA-graph safe (padding rows are dropped with a host check); other devices and caches
that are not contiguous go to the reference.
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.metadata import AttentionMetadata

#: ``(keep, rows)`` of :func:`write_rows`: the rows to write (None: all) and their K rows.
WriteRows = tuple[torch.Tensor | None, torch.Tensor]


def write_rows(slot_mapping: torch.Tensor, block_size: int) -> WriteRows:
    """Which of a step's tokens are written and where, the same for every layer.

    Returns ``(keep, rows)``: ``keep`` int64 indices of the tokens with a slot (None when every
    token has one) and ``rows`` int64, the K row of each kept token's slot in the
    ``[N * 2 * bs, Hkv * D]`` view of a layer's cache (its V row is ``rows + bs``)."""
    slots = slot_mapping.to(torch.long)
    keep = None
    if not bool((slots >= 0).all()):
        keep = (slots >= 0).nonzero().view(-1)
        slots = slots[keep]
    return keep, slots // block_size * (2 * block_size) + slots % block_size


def cpu_write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    rows: WriteRows | None = None,
) -> None:
    """Scatter this step's K/V into the paged cache, in place (``torch_ref.write_kv``'s contract).

    Args:
        key: ``[T, Hkv, D]``; value: the same shape; both cast to ``kv_cache.dtype``.
        kv_cache: ``[N, 2, bs, Hkv, D]``, one layer's cache.
        slot_mapping: int ``[T]``; token ``t`` goes to block ``slot // bs``, offset
            ``slot % bs``; negative slots write nothing; valid slots are distinct.
        rows: :func:`write_rows` of ``slot_mapping``, computed once per step (else here).
    """
    if (
        kv_cache.device.type != "cpu"
        or not kv_cache.is_contiguous()
        or key.shape[0] == 0
        or key.shape != value.shape
        or key.dim() != 3
        or key.shape[1:] != kv_cache.shape[3:]
    ):
        torch_ref.write_kv(key, value, kv_cache, slot_mapping)  # bad shapes: its clear error
        return
    n, _, bs, hkv, d = kv_cache.shape
    keep, krows = write_rows(slot_mapping, bs) if rows is None else rows
    if keep is not None:
        key, value = key[keep], value[keep]
    flat = kv_cache.view(n * 2 * bs, hkv * d)
    flat.index_copy_(0, krows, key.reshape(-1, hkv * d).to(kv_cache.dtype))
    flat.index_copy_(0, krows + bs, value.reshape(-1, hkv * d).to(kv_cache.dtype))


class PlannedKVWrite:
    """A K/V writer (``write(key, value, kv_cache, meta)``) whose CPU rows are found once per
    step: at the step's first write (the first layer) and reused by every later layer of the
    same ``meta``; an adapter that never writes computes nothing. Other devices go to the
    reference (graph-safe). Host bookkeeping: one identity check per layer."""

    _rows: tuple | None = None  # (meta, write_rows(...)) of the step being written

    def write(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        slots = meta.slot_mapping
        if slots.device.type != "cpu":
            torch_ref.write_kv(key, value, kv_cache, slots)
            return
        planned = self._rows
        if planned is None or planned[0] is not meta:
            planned = self._rows = (meta, write_rows(slots, meta.block_size))
        cpu_write_kv(key, value, kv_cache, slots, planned[1])
