"""What the engine builds once at start-up: the KV pool, the scheduler's configuration, seeds of
``n > 1`` siblings, and the freeze of start-up objects for the cyclic garbage collector."""

from __future__ import annotations

import atexit
import gc
import logging

from layerzero_serve._model_source import LoadedModel
from layerzero_serve.config import EngineConfig, kv_budget_bytes
from layerzero_serve.kv_cache import KVCache, KVCacheSpec
from layerzero_serve.runner import measure_graph_memory
from layerzero_serve.scheduler import SchedulerConfig

logger = logging.getLogger("layerzero_serve")
_UNFREEZE_AT_EXIT: list[bool] = []


def kv_pool(cfg, loaded: LoadedModel, spec: KVCacheSpec, shape, graph_bucket: int) -> KVCache:
    """The KV tensors: ``num_kv_blocks`` if given, else the memory budget minus what the CUDA
    graphs of the largest bucket (``graph_bucket``; 0 = no graphs) were measured to take."""
    device = loaded.resolved.device
    if cfg.num_kv_blocks is not None:
        kv_cache = KVCache(spec, num_blocks=cfg.num_kv_blocks, device=device)
    else:
        budget = kv_budget_bytes(cfg, device)
        if graph_bucket:  # graph memory is measured first and kept out of the KV budget
            max_len = loaded.resolved.max_model_len
            budget -= measure_graph_memory(
                loaded.model, spec, shape, graph_bucket, max_len, device, cfg.max_num_seqs
            )
        kv_cache = KVCache(spec, budget_bytes=budget, device=device)
    logger.info(
        "KV pool: %d blocks of %d tokens, %.2f GiB",
        kv_cache.num_blocks,
        cfg.block_size,
        kv_cache.nbytes / 2**30,
    )
    return kv_cache


def scheduler_config(cfg: EngineConfig, max_model_len: int, speculating: bool):
    return SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=cfg.enable_chunked_prefill,
        max_prefill_chunk=cfg.max_prefill_chunk,
        policy=cfg.policy,
        # drafts need KV slots past the last token: reserve them with every allocation
        num_lookahead_tokens=cfg.num_speculative_tokens if speculating else 0,
    )


def sibling_seed(seed: int | None, k: int, n: int) -> int | None:
    """The seed of sample ``k`` of an ``n``-sample request seeded with ``seed`` (n > 1 siblings
    draw distinct streams); None when the params' seed applies as it is."""
    return None if seed is None or n == 1 else (seed + k * 0x9E3779B97F4A7C15) % (1 << 63)


def freeze_startup_objects() -> None:
    """Start-up objects (weights' Python wrappers, the block pool) never die: keep the cyclic
    collector off them so its passes stay short on the hot path."""
    gc.collect()
    gc.freeze()
    if not _UNFREEZE_AT_EXIT:  # let interpreter shutdown free them normally (once)
        atexit.register(gc.unfreeze)
        _UNFREEZE_AT_EXIT.append(True)
