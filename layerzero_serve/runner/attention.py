"""The runtime's attention interface: what every model attention layer calls.

``AttentionDispatch(kv_cache, kernels)`` holds one implementation per phase, chosen by the
selection engine once per plan (decode, prefill/mixed). Each step, ``begin_step(meta)`` picks
the phase's implementation and runs its host-side ``plan``; each layer then calls
``dispatch(layer_idx, q, k, v, meta)``, which writes this step's K/V into the paged cache
through ``meta.slot_mapping`` and attends through ``meta.block_tables``. No selection happens
per step or per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerzero_serve.kernels.attention_api import PagedAttentionImpl
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kv_cache.storage import KVCache
from layerzero_serve.selection.selector import KernelChoice


@dataclass(slots=True)
class PhaseKernel:
    choice: KernelChoice
    impl: PagedAttentionImpl


class AttentionDispatch:
    """Callable attention over a KVCache with per-phase kernels.

    Shapes: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]`` in q's dtype.
    """

    def __init__(self, kv_cache: KVCache, decode: PhaseKernel, prefill: PhaseKernel) -> None:
        self.kv_cache = kv_cache
        self.decode = decode
        self.prefill = prefill
        self._active = prefill

    @property
    def name(self) -> str:
        return f"decode={self.decode.choice.name}, prefill={self.prefill.choice.name}"

    def begin_step(self, meta: AttentionMetadata) -> PhaseKernel:
        """Pick the phase's kernel and plan it (host work, once per step, outside graphs)."""
        self._active = (
            self.decode
            if meta.is_decode_only and (meta.num_tokens == meta.num_seqs)
            else self.prefill
        )
        self._active.impl.plan(meta)
        return self._active

    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        impl = self._active.impl
        cache = self.kv_cache.tensors[layer_idx]
        impl.write_kv(k, v, cache, meta)
        return impl.run(q, cache, meta)
