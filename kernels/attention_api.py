"""The plan/run contract every paged-attention adapter follows.

* ``plan(meta)``: host work once per step (index buffers, wrapper planning), never captured in
  a CUDA graph. In graph mode an adapter owns fixed-size buffers sized for its batch bucket and
  ``plan`` only refills them.
* ``write_kv(key, value, kv_cache, meta)`` and ``run(query, kv_cache, meta)``: per layer;
  graph-safe when the kernel's spec says ``graph_safe``.

Shapes: query ``[T, Hq, D]``; key/value ``[T, Hkv, D]``; kv_cache one layer's
``[num_blocks, 2, block_size, Hkv, D]`` (FlashInfer's NHD paged layout); output ``[T, Hq, D]``
in the query's dtype; softmax scale ``D ** -0.5``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from layerzero_serve.kernels.cpu_kv_write import PlannedKVWrite
from layerzero_serve.kernels.metadata import AttentionMetadata


class PagedAttentionImpl(Protocol):
    """A paged-attention kernel (decode, prefill/extend or verification): ``plan`` once per
    step on the host, ``write_kv`` and ``run`` per layer (shapes in the module docstring).

    CUDA graphs: ``plan`` is host work outside capture; ``write_kv`` and ``run`` are captured when
    the kernel's spec says ``graph_safe`` (no host sync, shapes fixed by the plan).
    """

    name: str

    def plan(self, meta: AttentionMetadata) -> None: ...

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None: ...

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor: ...


class KVWriter(Protocol):
    """The ``Op.KV_WRITE`` contract: write this step's K/V through the slot mapping.

    * ``plan(meta)``: host work once per step (may be a no-op); never inside a graph.
    * ``write(key, value, kv_cache, meta)``: per layer. ``key``/``value`` ``[T, Hkv, D]`` in the
      cache's dtype; ``kv_cache`` one layer's ``[num_blocks, 2, block_size, Hkv, D]``; token
      ``t`` goes to slot ``meta.slot_mapping[t]`` and slot -1 (padding) writes nothing.
      Graph-safe when the kernel's spec says ``graph_safe``.

    CUDA graphs: ``write`` is captured when the kernel's spec says ``graph_safe``; ``plan`` never
    is.
    """

    name: str

    def plan(self, meta: AttentionMetadata) -> None: ...

    def write(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None: ...


class SlotKVWrite:
    """A ``KVWriter`` over a slot-mapping write function
    ``fn(key, value, kv_cache, slot_mapping)`` (``torch_ref.write_kv``, ``triton_write_kv``):
    no host planning, graph-safe when ``fn`` is."""

    name = "kv_write"

    def __init__(self, fn) -> None:
        self._fn = fn

    def plan(self, meta: AttentionMetadata) -> None:
        pass

    def write(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        self._fn(key, value, kv_cache, meta.slot_mapping)


class ScatterKVWrite(PlannedKVWrite):
    """Shared ``plan``/``write_kv`` for adapters that write K/V with the torch scatter
    (graph-safe, skips slot -1; on the CPU ``cpu_write_kv``, see ``PlannedKVWrite``) and
    branch on whether the step is decode-only."""

    _decode: bool = False

    def plan(self, meta: AttentionMetadata) -> None:
        self._decode = meta.is_decode_only and meta.num_tokens == meta.num_seqs

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        self.write(key, value, kv_cache, meta)
