"""KV tensors and the int32 metadata (block tables, slot mappings) that index them.

Layout per layer: ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (K at index 0, V at 1),
FlashInfer's NHD paged layout, so its kernels read our cache without a copy. A slot is
``block_id * block_size + offset``; slot -1 means "write nothing" (padding rows).

The pure layout helpers (``build_block_table``, ``build_positions``, ``build_slot_mapping``) live
in ``layerzero_serve.kernels.block_layout``, where the kernels' own host planning reads them; they
are re-exported here and from ``layerzero_serve.kv_cache``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from layerzero_serve.errors import ValidationError, check_int
from layerzero_serve.kernels.block_layout import (  # re-exported: kv_cache's public names
    INT32_MAX,
    build_block_table,
    build_positions,
    build_slot_mapping,
)
from layerzero_serve.kernels.spec import KV_DTYPES
from layerzero_serve.kv_cache._block_pool import MAX_NUM_BLOCKS, check_num_blocks

__all__ = [
    "INT32_MAX",
    "BlockTableCache",
    "KVCache",
    "KVCacheSpec",
    "build_block_table",
    "build_positions",
    "build_slot_mapping",
]


#: ``kv_cache_dtype`` values (the selection engine's ``KV_DTYPES``) -> the storage dtype: "auto"
#: stores K/V in the model's dtype; the FP8 formats store one byte per value with a per-tensor
#: (per layer, K and V apart) scale: ``stored = x / scale``.
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = dict(
    zip(KV_DTYPES, (None, torch.float8_e4m3fn, torch.float8_e5m2), strict=True)
)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Geometry and dtype of a paged KV cache: ``num_layers`` tensors of
    ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (K at index 0 of the second axis,
    V at 1) in ``storage_dtype``: ``dtype`` (the model's, a ``torch.dtype``) when ``kv_dtype``
    is "auto", else the FP8 format it names (``KV_CACHE_DTYPES``). Every integer field is >= 1.

    CUDA graphs: a host-side description.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: torch.dtype = torch.float16
    kv_dtype: str = "auto"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 1))
        if not isinstance(self.dtype, torch.dtype):
            raise ValidationError("dtype", self.dtype, "a torch.dtype")
        if not isinstance(self.kv_dtype, str) or self.kv_dtype not in KV_CACHE_DTYPES:
            allowed = f"one of {list(KV_CACHE_DTYPES)}"
            raise ValidationError("kv_cache_dtype", self.kv_dtype, allowed)

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype of the cache tensors."""
        return KV_CACHE_DTYPES[self.kv_dtype] or self.dtype

    @property
    def is_fp8(self) -> bool:
        return self.kv_dtype != "auto"

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers (K and V)."""
        elem = torch.empty((), dtype=self.storage_dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem

    def num_blocks_for_budget(self, budget_bytes: int) -> int:
        """Blocks that fit ``budget_bytes`` (a finite number of bytes), at most
        ``MAX_NUM_BLOCKS``: a larger budget is simply not used up."""
        if (
            isinstance(budget_bytes, bool)
            or not isinstance(budget_bytes, numbers.Real)
            or not math.isfinite(budget_bytes)
        ):
            raise ValidationError("budget_bytes", budget_bytes, "a finite number of bytes")
        n = min(int(budget_bytes) // self.bytes_per_block, MAX_NUM_BLOCKS)
        if n < 2:
            raise ValidationError(
                "kv_cache_bytes",
                budget_bytes,
                f">= {2 * self.bytes_per_block} (two blocks of {self.bytes_per_block} bytes)",
            )
        return n


_SCALE_MIN = torch.finfo(torch.float32).tiny  # 1 / scale stays finite in float32
_SCALE_MAX = torch.finfo(torch.float32).max


def check_kv_scale(param: str, x: object) -> float:
    """An FP8 KV scale as a float: a real number in ``[2**-126, 3.4e38]`` (finite, > 0, and
    its reciprocal finite in float32), else a ValidationError naming ``param``."""
    ok = isinstance(x, numbers.Real) and not isinstance(x, bool)
    if not ok or not math.isfinite(x) or not _SCALE_MIN <= x <= _SCALE_MAX:
        raise ValidationError(param, x, f"a finite scale in [{_SCALE_MIN:.3g}, {_SCALE_MAX:.3g}]")
    return float(x)


class KVCache:
    """Per-layer KV tensors on one device.

    Give exactly one of ``num_blocks`` or ``budget_bytes``. ``tensors[layer]`` has shape
    ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``.

    CUDA graphs: the tensors are allocated once, here, and captured graphs bake their addresses in:
    never reallocate them after capture. ``copy_blocks`` runs eagerly between steps.
    """

    def __init__(
        self,
        spec: KVCacheSpec,
        num_blocks: int | None = None,
        budget_bytes: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if (num_blocks is None) == (budget_bytes is None):
            raise ValidationError(
                "num_blocks/budget_bytes", (num_blocks, budget_bytes), "exactly one of the two"
            )
        if not isinstance(spec, KVCacheSpec):
            raise ValidationError("spec", spec, "a KVCacheSpec")
        if num_blocks is None:
            num_blocks = spec.num_blocks_for_budget(budget_bytes)
        num_blocks = check_num_blocks(num_blocks)
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (num_blocks, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.tensors = [
            torch.zeros(shape, dtype=spec.storage_dtype, device=device)
            for _ in range(spec.num_layers)
        ]
        # FP8: per-layer scales (stored = value / scale), 1.0 until set_scales; and byte views
        # of the tensors, through which writers and block copies move FP8 values unchanged
        # (several torch ops have no FP8 kernel on the CPU).
        self.k_scales = [1.0] * spec.num_layers
        self.v_scales = [1.0] * spec.num_layers
        self.byte_views = [t.view(torch.uint8) for t in self.tensors] if spec.is_fp8 else None

    def set_scales(self, k_scales: Sequence[float], v_scales: Sequence[float]) -> None:
        """Per-layer FP8 scales (one per layer each; finite and > 0, else a ValidationError
        naming the layer). Set before the first write and before any CUDA graph is captured
        (graphs bake the scales in). Host only."""
        for name, scales in (("k_scale", k_scales), ("v_scale", v_scales)):
            vals = list(scales)
            if len(vals) != self.spec.num_layers:
                n = self.spec.num_layers
                raise ValidationError(name, len(vals), f"{n} values (one per layer)")
            for i, x in enumerate(vals):
                check_kv_scale(f"model.layers.{i}.self_attn.{name}", x)
        self.k_scales = [float(x) for x in k_scales]
        self.v_scales = [float(x) for x in v_scales]

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (copy-on-write after a fork), in the
        order given: a pair may copy a block that an earlier pair of the same call wrote."""
        if not pairs:
            return
        n = self.num_blocks
        for pair in pairs:  # host ints, a handful per fork: no device work
            try:
                src, dst = pair
            except (TypeError, ValueError):
                src = dst = None
            if not (_is_block_id(src, n) and _is_block_id(dst, n)):
                raise ValidationError(
                    "pairs", pair, f"(src, dst) pairs of block ids, integers in [0, {n - 1}]"
                )
        tensors = self.byte_views or self.tensors  # bytes: index_copy_ has no CPU FP8 kernel
        srcs, dsts = [p[0] for p in pairs], [p[1] for p in pairs]
        if not set(srcs).isdisjoint(dsts):
            # a chain (a fork of a fork in one step: A -> B, then B -> C): in order, one by one,
            # so every copy reads its source after the copies before it have written it
            for s, d in zip(srcs, dsts, strict=True):
                for t in tensors:
                    t[d].copy_(t[s])
            return
        dev = self.tensors[0].device
        src = torch.tensor(srcs, dtype=torch.long, device=dev)
        dst = torch.tensor(dsts, dtype=torch.long, device=dev)
        for t in tensors:
            t.index_copy_(0, dst, t.index_select(0, src))


def _is_block_id(value: object, num_blocks: int) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, np.integer))
        and 0 <= value < num_blocks
    )


class BlockTableCache:
    """A step's block table ``[rows, width]`` int32 built from the live per-request block id
    lists, keeping each row between steps while it belongs to the same list and the KV manager
    reported no edit other than appends (``KVCacheManager.table_edits``): then only the ids
    appended since are written. The same result as :func:`build_block_table` (zero padded),
    for a fraction of its host cost in steady decoding (a full rebuild converts every id).

    Host only; returns a new contiguous array each step (or a view, see :meth:`build`).
    """

    def __init__(self, width: int = 1, rows: int = 1) -> None:
        self._table = np.zeros((max(rows, 1), max(width, 1)), dtype=np.int32)
        self._lists: list[object] = [None] * len(self._table)  # holds them: ids stay unique
        self._lens = [0] * len(self._table)
        self._edits = -1

    def build(
        self, block_ids: Sequence[list[int]], edits: int = -1, copy: bool = True
    ) -> np.ndarray:
        """int32 ``[len(block_ids), max len]``; ``edits`` as ``SchedulerOutput.table_edits``
        (-1: unknown, every row is rewritten). ``copy=False`` returns a view that the next
        build overwrites (for callers that copy it themselves, like the graph staging)."""
        n = len(block_ids)
        lens = list(map(len, block_ids))
        width = max(lens, default=0)
        if n > len(self._table) or width > self._table.shape[1]:
            self._grow(n, width)
        keep = edits >= 0 and edits == self._edits
        self._edits = edits
        if not keep:  # a list may have changed in place: no row is trusted, used now or not
            self._lists = [None] * len(self._lists)
        table, lists, cached = self._table, self._lists, self._lens
        for i, ids in enumerate(block_ids):
            k, m = lens[i], cached[i]
            if keep and lists[i] is ids and k >= m:
                if k > m:  # only appends since the last step
                    table[i, m:k] = ids[m:k]
            else:
                table[i, :k] = ids
                if m > k:
                    table[i, k:m] = 0
                lists[i] = ids
            cached[i] = k
        # a copy (tens of microseconds) by default: callers keep it past the next build, and a
        # contiguous array becomes a dense tensor
        view = table[:n, :width]
        return view.copy() if copy else view

    def _grow(self, rows: int, width: int) -> None:
        old = self._table
        r = max(rows, 2 * len(old)) if rows > len(old) else len(old)
        w = max(width, 2 * old.shape[1]) if width > old.shape[1] else old.shape[1]
        self._table = np.zeros((r, w), dtype=np.int32)
        self._table[: len(old), : old.shape[1]] = old
        self._lists += [None] * (r - len(old))
        self._lens += [0] * (r - len(old))
