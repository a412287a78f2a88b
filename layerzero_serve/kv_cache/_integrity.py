"""Exhaustive invariant check of a KVCacheManager (tests and debugging; O(num_blocks))."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from layerzero_serve.kv_cache._block_pool import NULL_BLOCK_ID

if TYPE_CHECKING:  # pragma: no cover
    from layerzero_serve.kv_cache._manager import KVCacheManager


class IntegrityError(AssertionError):
    """A KV cache invariant does not hold."""


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise IntegrityError(msg)


def check_integrity(mgr: KVCacheManager) -> None:
    """Assert:

    * the free list walks (both directions) to exactly the blocks with ``ref_cnt == 0``;
    * free + cached-evictable + in-use == total usable blocks, and ``num_free`` is exact;
    * every block's ref count equals the number of requests holding it;
    * every hashed block is in the hash map under its hash, the map holds nothing else, and
      its hash recomputes from (parent hash, token ids);
    * each request's committed blocks carry the request's own chain hashes;
    * the null block is never free, never hashed, never owned by a request.
    """
    pool = mgr.pool
    free = list(pool.iter_free())
    free_ids = [b.block_id for b in free]
    _require(len(set(free_ids)) == len(free_ids), "free list visits a block twice")
    back = []
    node = pool._tail.prev_free
    while node is not pool._head:
        back.append(node.block_id)
        node = node.prev_free
    _require(back[::-1] == free_ids, "free list forward and backward walks differ")
    _require(len(free) == pool.num_free, f"num_free={pool.num_free} but list has {len(free)}")
    _require(NULL_BLOCK_ID not in free_ids, "null block is on the free list")
    null = pool.null_block
    _require(null.block_hash is None, "null block is hashed")

    owners: Counter[int] = Counter()
    for rid, table in mgr.tables().items():
        blocks = table.blocks
        ids = [b.block_id for b in blocks]
        _require(ids == list(table), f"{rid}: block table out of sync with blocks")
        _require(table.request.request_id == rid, f"{rid}: table filed under another id")
        held = table.request.block_table  # the scheduler's handle, when it holds one
        _require(held is None or held is table, f"{rid}: the request holds a stale table")
        _require(table.capacity <= len(ids) * mgr.block_size, f"{rid}: capacity too large")
        comp = table.request.num_computed_tokens
        if table.capacity > comp and comp % mgr.block_size and comp // mgr.block_size < len(ids):
            _require(
                blocks[comp // mgr.block_size].ref_cnt == 1,
                f"{rid}: may write into a shared block without copying it",
            )
        _require(NULL_BLOCK_ID not in ids, f"{rid}: owns the null block")
        owners.update(ids)
    free_set = set(free_ids)
    num_cached_free = num_plain_free = num_used = 0
    for block in pool.blocks[1:]:
        num_owners = owners.get(block.block_id, 0)
        _require(
            block.ref_cnt == num_owners,
            f"block {block.block_id}: ref_cnt={block.ref_cnt} owners={num_owners}",
        )
        _require((block.ref_cnt == 0) == (block.block_id in free_set), f"{block} free-list state")
        if block.ref_cnt > 0:
            num_used += 1
        elif block.block_hash is None:
            num_plain_free += 1
        else:
            num_cached_free += 1
        if block.block_hash is not None:
            bucket = pool.cached.get(block.block_hash, {})
            _require(bucket.get(block.block_id) is block, f"{block} missing from the hash map")
            parent = block.parent_hash
            if parent is not None:
                _require(
                    mgr._hash_fn(parent, block.token_ids) == block.block_hash,
                    f"{block}: hash does not match (parent, tokens)",
                )
    _require(
        num_plain_free + num_cached_free + num_used == pool.num_blocks - 1,
        "free + cached + in-use != total",
    )
    for h, bucket in pool.cached.items():
        for bid, block in bucket.items():
            _require(block.block_id == bid and block.block_hash == h, f"stale map entry {bid}")
    _check_request_chains(mgr)


def _check_request_chains(mgr: KVCacheManager) -> None:
    bs = mgr.block_size
    for rid, table in mgr.tables().items():
        req, blocks, n = table.request, table.blocks, table.num_committed
        _require(n <= len(blocks), f"{rid}: more committed blocks than blocks")
        _require(n * bs <= req.num_tokens, f"{rid}: committed blocks beyond its tokens")
        for i in range(n):
            block = blocks[i]
            want = tuple(req.all_token_ids[i * bs : (i + 1) * bs])
            _require(block.block_hash == req.block_hashes[i], f"{rid}: block {i} hash != chain")
            _require(block.token_ids == want, f"{rid}: block {i} tokens differ from the request's")
