"""The runtime's attention interface: what every model attention layer calls.

``PagedAttention(kv_cache)(layer_idx, q, k, v, meta)`` writes this step's K/V into the paged
cache through ``meta.slot_mapping`` and attends over the whole sequence through
``meta.block_tables``. Which kernel does it is decided once per plan (the selection engine);
until then the torch reference kernels serve every backend.
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kv_cache.storage import KVCache


class PagedAttention:
    """Callable attention over a KVCache, with the torch reference kernels.

    Shapes: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]`` in q's dtype.
    Decode-only batches take the vectorised decode path. Not graph-safe (host lists are read).
    """

    name = "torch_ref"

    def __init__(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache

    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        cache = self.kv_cache.tensors[layer_idx]
        torch_ref.write_kv(k, v, cache, meta.slot_mapping)
        if meta.is_decode_only and meta.num_tokens == meta.num_seqs:
            return torch_ref.paged_decode(q, cache, meta.block_tables, meta.seq_lens)
        return torch_ref.paged_attention(q, cache, meta)
