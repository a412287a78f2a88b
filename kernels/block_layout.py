"""The paged KV layout as the kernels index it: block tables, positions and slot mappings.

Layout per layer: ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (K at index 0, V at 1),
FlashInfer's NHD paged layout. A slot is ``block_id * block_size + offset``; slot -1 means "write
nothing" (padding rows). Block 0 is the null block that pads block tables.

Pure numpy host helpers (no torch, no device work): the runtime builds each step's metadata with
them (``layerzero_serve.kv_cache`` re-exports them) and so do the kernels' own host planning
(:meth:`AttentionMetadata.from_host`, FlashInfer's KV append). CUDA graphs: host only, never
captured.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np

from layerzero_serve.errors import ValidationError, check_int

__all__ = ["INT32_MAX", "build_block_table", "build_positions", "build_slot_mapping"]

INT32_MAX = (1 << 31) - 1  # block ids and slots are int32 on the device


def build_block_table(
    block_ids: Sequence[Sequence[int]], max_num_blocks: int | None = None
) -> np.ndarray:
    """Rows of block ids padded with 0 (the null block) -> int32 ``[num_seqs, max_num_blocks]``.

    Block ids must be integers in ``[0, 2**31 - 1]``."""
    if max_num_blocks is not None:
        max_num_blocks = check_int("max_num_blocks", max_num_blocks, 0, INT32_MAX)
    try:
        lens = np.fromiter(map(len, block_ids), dtype=np.int64, count=len(block_ids))
    except TypeError as e:
        raise ValidationError("block_ids", block_ids, "a sequence of block id lists") from e
    width = int(lens.max(initial=0)) if max_num_blocks is None else max_num_blocks
    if len(block_ids) and lens.max() > width:
        raise ValidationError("max_num_blocks", width, f">= {int(lens.max())} (longest table)")
    # chain.from_iterable: about 2x faster than a nested generator (0.6 vs 1.1 ms for 256 x 128)
    # (a conversion error costs nothing on valid input; one vectorised min catches negatives)
    try:
        flat = np.fromiter(chain.from_iterable(block_ids), dtype=np.int32, count=int(lens.sum()))
    except (TypeError, ValueError, OverflowError) as e:
        raise ValidationError(
            "block_ids", block_ids, f"lists of integer block ids in [0, {INT32_MAX}]", str(e)
        ) from e
    if flat.size and flat.min() < 0:
        raise ValidationError(
            "block_ids", int(flat.min()), f"integer block ids in [0, {INT32_MAX}]"
        )
    table = np.zeros((len(block_ids), width), dtype=np.int32)
    mask = np.arange(width)[None, :] < lens[:, None]
    table[mask] = flat
    return table


def build_positions(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``arange(start, start+len)`` per sequence without a Python loop.

    Returns ``(seq_index, positions)``, both int64 ``[sum(lens)]``. ``starts`` and ``lens`` are
    integer arrays of one length, ``lens >= 0``.
    """
    starts = np.asarray(starts)
    lens = np.asarray(lens)
    # O(1) checks only (this runs every step); negative lens fail inside np.repeat
    if starts.shape != lens.shape or lens.ndim != 1:
        raise ValidationError(
            "starts/lens", (starts.shape, lens.shape), "1-d arrays of the same length"
        )
    if lens.size and (starts.dtype.kind not in "iu" or lens.dtype.kind not in "iu"):
        raise ValidationError("starts/lens", (str(starts.dtype), str(lens.dtype)), "integer arrays")
    total = int(lens.sum())
    try:
        seq_index = np.repeat(np.arange(len(lens)), lens)
    except ValueError as e:
        raise ValidationError("lens", lens.tolist(), "integers >= 0", str(e)) from e
    offsets = np.cumsum(lens) - lens  # first flat index of each sequence
    positions = np.arange(total) - offsets[seq_index] + starts[seq_index]
    return seq_index, positions


def build_slot_mapping(
    block_table: np.ndarray, starts: np.ndarray, lens: np.ndarray, block_size: int
) -> np.ndarray:
    """int32 ``[sum(lens)]`` slots where token ``start .. start+len-1`` of each sequence lives.
    ``block_table`` has one row per sequence, wide enough for ``start + len`` tokens."""
    block_size = check_int("block_size", block_size, 1)
    seq_index, positions = build_positions(starts, lens)
    try:
        blocks = block_table[seq_index, positions // block_size].astype(np.int64)
    except IndexError as e:
        raise ValidationError(
            "starts/lens",
            "positions past the block table",
            f"rows and positions inside block_table {block_table.shape}",
            str(e),
        ) from e
    return (blocks * block_size + positions % block_size).astype(np.int32)
