"""Paged KV cache: block pool, prefix cache, KV tensors and block-table metadata."""

from layerzero_serve.kv_cache._block_pool import MAX_NUM_BLOCKS, NULL_BLOCK_ID, Block, BlockPool
from layerzero_serve.kv_cache._hashing import HASH_ALGORITHMS
from layerzero_serve.kv_cache._integrity import IntegrityError
from layerzero_serve.kv_cache._manager import KVCacheManager, PrefixMatch
from layerzero_serve.kv_cache._storage import (
    KV_CACHE_DTYPES,
    BlockTableCache,
    KVCache,
    KVCacheSpec,
    build_block_table,
    build_positions,
    build_slot_mapping,
    check_kv_scale,
)

__all__ = [
    "Block",
    "BlockPool",
    "BlockTableCache",
    "HASH_ALGORITHMS",
    "IntegrityError",
    "KV_CACHE_DTYPES",
    "KVCache",
    "KVCacheManager",
    "KVCacheSpec",
    "MAX_NUM_BLOCKS",
    "NULL_BLOCK_ID",
    "PrefixMatch",
    "build_block_table",
    "build_positions",
    "build_slot_mapping",
    "check_kv_scale",
]
