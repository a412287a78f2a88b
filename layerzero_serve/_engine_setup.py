"""What the engine builds once at start-up: the model side every tensor-parallel rank builds
alike (weights, kernel plans, KV pool), the scheduler's configuration, seeds of ``n > 1``
siblings, and the freeze of start-up objects for the cyclic garbage collector."""

from __future__ import annotations

import atexit
import gc
import logging
import os
from dataclasses import dataclass

import torch

from layerzero_serve._model_source import (
    LoadedModel,
    load_model_source,
    peek_model_config,
    weight_bytes,
)
from layerzero_serve._models.kv_scales import DEFAULT_KV_SCALE, read_kv_scales
from layerzero_serve.config import EngineConfig, kv_budget_bytes
from layerzero_serve.kv_cache import KVCache, KVCacheSpec
from layerzero_serve.runner import choose_cpu_threads, measure_graph_memory, prepare_model
from layerzero_serve.scheduler import SchedulerConfig
from layerzero_serve.selection import Selector, get_selector, probe_device, startup_timings
from layerzero_serve.selection.plans import ModelShape, batch_buckets, model_plans

logger = logging.getLogger("layerzero_serve")
_UNFREEZE_AT_EXIT: list[bool] = []


@dataclass(slots=True)
class ModelSide:
    """What one rank holds of the model: the weights (its share under tensor parallelism),
    the kernels' shape, the KV pool, the selector and the decode graph buckets."""

    loaded: LoadedModel
    shape: ModelShape
    spec: KVCacheSpec
    kv_cache: KVCache
    selector: Selector
    buckets: list[int]
    use_graphs: bool


def build_model_side(cfg: EngineConfig, tp=None) -> ModelSide:
    """Load the model, plan its kernels and size its KV pool; ``tp`` (a ``TPGroup``): this
    rank's share, with the collectives installed and the pool's block count agreed by all
    ranks. Every rank runs this in the same order (graph memory is measured with the
    collectives in place)."""
    loaded = load_model_source(
        cfg, None if tp is None else (tp.rank, tp.world_size), None if tp is None else tp.device
    )
    if tp is not None:
        loaded.model.set_tp(tp)
    device = loaded.resolved.device
    if device.type == "cpu":
        if tp is None:
            choose_cpu_threads(loaded.config.hidden_size, cfg.cpu_threads)
        else:  # ranks share the host's cores
            torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // tp.world_size))
    shape, spec = prepare_model(loaded, cfg.block_size, cfg.max_num_seqs, cfg.kv_cache_dtype)
    use_graphs = device.type == "cuda" and not cfg.enforce_eager
    buckets = batch_buckets(cfg.max_graph_batch or min(cfg.max_num_seqs, 256))
    selector = get_selector()
    # the device's measured kernel timings (`layerzero-serve tune`) before the runner's plans
    # are selected and KV is sized; LZ_TUNE_AT_STARTUP=1 measures the missing ones here
    plans = model_plans(
        probe_device(device), shape, cfg.block_size, cfg.max_num_seqs,
        buckets if use_graphs else None,
    )  # fmt: skip
    startup_timings(selector, device, plans)
    kv_cache = kv_pool(cfg, loaded, spec, shape, buckets[-1] if use_graphs else 0, tp)
    return ModelSide(loaded, shape, spec, kv_cache, selector, buckets, use_graphs)


def kv_pool(
    cfg, loaded: LoadedModel, spec: KVCacheSpec, shape, graph_bucket: int, tp=None
) -> KVCache:
    """The KV tensors: ``num_kv_blocks`` if given, else the memory budget minus what the CUDA
    graphs of the largest bucket (``graph_bucket``; 0 = no graphs) were measured to take.
    Tensor-parallel ranks (``tp``) all take the smallest count that fits on every rank."""
    device = loaded.resolved.device
    if cfg.num_kv_blocks is not None:
        kv_cache = KVCache(spec, num_blocks=cfg.num_kv_blocks, device=device)
    else:
        budget = kv_budget_bytes(cfg, device)
        draft_bpb, draft_weights = draft_model_costs(cfg, loaded.resolved.dtype)
        if draft_weights and device.type == "cuda":  # loaded after the pool: keep its room
            budget -= draft_weights
        if draft_bpb:  # the draft's KV pool has as many blocks as the target's: split the budget
            budget = budget * spec.bytes_per_block // (spec.bytes_per_block + draft_bpb)
        if graph_bucket:  # graph memory is measured first and kept out of the KV budget
            max_len = loaded.resolved.max_model_len
            budget -= measure_graph_memory(
                loaded.model, spec, shape, graph_bucket, max_len, device, cfg.max_num_seqs
            )
        if tp is None:
            kv_cache = KVCache(spec, budget_bytes=budget, device=device)
        else:
            blocks = tp.min_int(spec.num_blocks_for_budget(budget))
            kv_cache = KVCache(spec, num_blocks=blocks, device=device)
    logger.info(
        "KV pool: %d blocks of %d tokens, %.2f GiB (%s)",
        kv_cache.num_blocks,
        cfg.block_size,
        kv_cache.nbytes / 2**30,
        str(spec.storage_dtype).removeprefix("torch."),
    )
    if spec.is_fp8:
        set_fp8_scales(kv_cache, loaded)
    return kv_cache


def draft_model_costs(cfg: EngineConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of one KV block, bytes of the weights) of the configured draft model in
    ``dtype``, read from its config before it is loaded; (0, 0) without one. The draft's KV
    pool has the target's block count (``SpecCoordinator``), so the KV budget covers both."""
    if cfg.speculative_method != "draft_model" or not cfg.speculative_model:
        return 0, 0
    dmc = peek_model_config(EngineConfig(model=str(cfg.speculative_model), device=cfg.device))
    spec = KVCacheSpec(dmc.num_layers, dmc.num_kv_heads, dmc.head_dim, cfg.block_size, dtype)
    return spec.bytes_per_block, weight_bytes(dmc, dtype)


def set_fp8_scales(kv_cache: KVCache, loaded: LoadedModel) -> None:
    """The FP8 cache's per-layer scales: the checkpoint's, else the default (logged)."""
    scales = read_kv_scales(loaded.path, kv_cache.spec.num_layers)
    if scales is None:
        logger.info(
            "KV cache %s: the checkpoint has no k_scale/v_scale tensors; scale %.1f for K and V",
            kv_cache.spec.kv_dtype,
            DEFAULT_KV_SCALE,
        )
        return
    kv_cache.set_scales(*scales)
    logger.info(
        "KV cache %s: scales from the checkpoint (K %.3g..%.3g, V %.3g..%.3g)",
        kv_cache.spec.kv_dtype,
        min(scales[0]), max(scales[0]), min(scales[1]), max(scales[1]),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class GraphSetup:
    """Rank 0's graph decisions (sent to tensor-parallel workers before any capture): the
    decode buckets' sequence length, the verification buckets and tokens per row
    (``verify_q`` 0: no speculation) and whether graphs are captured at all."""

    graph_len: int
    verify_buckets: tuple[int, ...]
    verify_q: int
    use_graphs: bool


def mixed_graph_tokens(cfg: EngineConfig) -> int:
    """Largest token count of a prefill / mixed step captured piecewise (0: none):
    ``max_mixed_graph_tokens``, default min(max_num_batched_tokens, 2048)."""
    limit = cfg.max_mixed_graph_tokens
    return min(cfg.max_num_batched_tokens, 2048) if limit is None else limit


def capture_graphs(runner, buckets: list[int], setup: GraphSetup, cfg: EngineConfig,
                   lenient: bool, progress: bool = True) -> None:  # fmt: skip
    """Decode buckets (graphs on or off: the same split-KV rule), then with graphs the decode
    graphs, the prefill / mixed-step graphs and the verification graphs, in this order on
    every tensor-parallel rank (their collectives must match). ``lenient`` (one rank): a
    mixed-step capture that fails leaves those steps eager, with a warning."""
    runner.set_decode_buckets(buckets, setup.graph_len)
    if not setup.use_graphs:
        return
    runner.enable_graphs(buckets, setup.graph_len, progress=progress)
    limit = mixed_graph_tokens(cfg)
    if limit:
        try:
            runner.enable_mixed_graphs(limit, progress=progress)
        except Exception as e:  # noqa: BLE001 - any capture failure: stay eager
            if not lenient:  # the other ranks captured: they cannot stay in step
                raise
            runner.mixed_graphs = None
            logger.warning("mixed-step graphs not captured, prefill runs eagerly: %r", e)
    if setup.verify_q:
        runner.enable_verify_graphs(
            list(setup.verify_buckets), setup.graph_len, setup.verify_q, progress=progress
        )


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
