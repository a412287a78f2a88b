"""Measure what CUDA graphs will take before the KV pool is sized from the memory budget."""

from __future__ import annotations

import gc
import logging

import torch

from layerzero_serve.kv_cache import KVCache, KVCacheSpec
from layerzero_serve.selection.plans import ModelShape

logger = logging.getLogger("layerzero_serve")


def measure_graph_memory(
    model: torch.nn.Module,
    spec: KVCacheSpec,
    shape: ModelShape,
    max_bucket: int,
    max_model_len: int,
    device: torch.device,
    max_num_seqs: int,
    margin: float = 0.2,
) -> int:
    """Capture the largest bucket against a throw-away KV cache just large enough for its block
    table, measure the memory the capture reserved (the shared pool's high-water mark is set by
    the largest bucket), free everything, and return that figure plus ``margin``."""
    from layerzero_serve.runner._model_runner import ModelRunner
    from layerzero_serve.sampling import Sampler

    width = -(-max_model_len // spec.block_size)
    scratch = KVCache(spec, num_blocks=width + 1, device=device)
    runner = ModelRunner(model, shape, scratch, Sampler(), device, max_num_seqs)
    runner.enable_graphs([max_bucket], max_model_len, progress=False)
    used = runner.graphs.graph_memory_bytes
    del runner, scratch
    gc.collect()
    torch.cuda.empty_cache()
    reserve = int(used * (1 + margin))
    logger.info(
        "graph memory (largest bucket %d): %.1f MiB measured, %.1f MiB reserved",
        max_bucket,
        used / 2**20,
        reserve / 2**20,
    )
    return reserve
