"""The runtime's attention interface: what every model attention layer calls.

``AttentionDispatch(kv_cache, kernels)`` holds one implementation per phase, chosen by the
selection engine once per plan (decode, prefill/mixed). Each step, ``begin_step(meta)`` picks
the phase's implementation and runs its host-side ``plan``; each layer then calls
``dispatch(layer_idx, q, k, v, meta)``, which writes this step's K/V into the paged cache
through ``meta.slot_mapping`` (with the ``Op.KV_WRITE`` kernel selected for the plan, or the
attention kernel's own ``write_kv`` when none is given) and attends through
``meta.block_tables``. No selection happens per step or per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerzero_serve.kernels.attention_api import KVWriter, PagedAttentionImpl
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kv_cache.storage import KVCache
from layerzero_serve.selection.selector import KernelChoice


@dataclass(slots=True)
class PhaseKernel:
    choice: KernelChoice
    impl: PagedAttentionImpl


@dataclass(slots=True)
class WriterKernel:
    choice: KernelChoice
    impl: KVWriter


class AttentionDispatch:
    """Callable attention over a KVCache with per-phase kernels.

    Shapes: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]`` in q's dtype.
    """

    def __init__(
        self,
        kv_cache: KVCache,
        decode: PhaseKernel,
        prefill: PhaseKernel,
        writer: WriterKernel | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.decode = decode
        self.prefill = prefill
        self.writer = writer
        self._active = prefill
        self._write = None if writer is None else writer.impl.write
        self.failed_write = False  # set when the KV writer raised (the runner's fallback reads it)

    @property
    def name(self) -> str:
        names = f"decode={self.decode.choice.name}, prefill={self.prefill.choice.name}"
        if self.writer is not None:
            names += f", kv_write={self.writer.choice.name}"
        return names

    def begin_step(self, meta: AttentionMetadata) -> PhaseKernel:
        """Pick the phase's kernel and plan it (host work, once per step, outside graphs)."""
        self._active = (
            self.decode
            if meta.is_decode_only and (meta.num_tokens == meta.num_seqs)
            else self.prefill
        )
        self._active.impl.plan(meta)
        if self.writer is not None:
            self.writer.impl.plan(meta)
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
        if self._write is None:
            impl.write_kv(k, v, cache, meta)
        else:
            try:  # zero-cost unless it raises
                self._write(k, v, cache, meta)
            except Exception:
                self.failed_write = True
                raise
        return impl.run(q, cache, meta)
