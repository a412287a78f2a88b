"""What every model stack (the engine's target model, a draft model) derives from a loaded
model before its KV cache and runner are built: the kernels' ``ModelShape``, the KV cache's
``KVCacheSpec``, and on CUDA the fused projections and the selected layer kernels. One
function, so the target and the draft cannot be wired differently.

CUDA graphs: host only (start-up).
"""

from __future__ import annotations

import torch

from layerzero_serve.kv_cache import KVCacheSpec
from layerzero_serve.runner._optimize import optimize_model
from layerzero_serve.selection.plans import ModelShape


def prepare_model(
    loaded, block_size: int, max_num_seqs: int, kv_dtype: str = "auto"
) -> tuple[ModelShape, KVCacheSpec]:
    """(kernel shape, KV spec) of ``loaded`` (``_model_source.LoadedModel``: its config,
    resolved dtype and device) with KV blocks of ``block_size`` tokens stored as ``kv_dtype``
    (``kv_cache.KV_CACHE_DTYPES``); on CUDA the model is optimised in place for batches up to
    ``max_num_seqs`` (``optimize_model``)."""
    mc, dtype, device = loaded.config, loaded.resolved.dtype, loaded.resolved.device
    # a tensor-parallel rank plans (and caches K/V) for its own heads; sampling sees the
    # gathered logits, so the vocabulary stays whole
    heads = getattr(loaded.model, "layout", None) or mc
    shape = ModelShape(
        str(dtype).removeprefix("torch."),
        mc.head_dim,
        heads.num_heads,
        heads.num_kv_heads,
        mc.vocab_size,
        kv_dtype,
    )
    spec = KVCacheSpec(mc.num_layers, heads.num_kv_heads, mc.head_dim, block_size, dtype, kv_dtype)
    if torch.device(device).type == "cuda":
        optimize_model(loaded.model, shape, device, block_size, max_num_seqs)
    return shape, spec
