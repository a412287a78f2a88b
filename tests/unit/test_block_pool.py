"""Block pool and slot allocation: exact block ids, free-list order, eviction, atomic failure.

Every expected block id below is derived by hand from the documented free-list rules:

* a fresh pool hands out 1, 2, 3, ... (block 0 is the null block);
* a freed block without a hash goes to the FRONT of the free list (reused first);
* a freed block with a hash goes to the BACK (LRU; evicted last, lazily);
* a request's blocks are freed tail first, so its tail is evicted before its head.
"""

from __future__ import annotations

import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import NULL_BLOCK_ID, BlockPool, KVCacheManager
from layerzero_serve.types import Request

# ---- helpers --------------------------------------------------------------------------------


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.iter_free()]


def ids_of(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def req(rid: str, tokens: list[int], **kw) -> Request:
    return Request(rid, list(tokens), max_tokens=16, **kw)


def prefill(mgr: KVCacheManager, r: Request, use_prefix: bool = True) -> list[int]:
    """Admit ``r`` (with prefix hits), compute its whole prompt and commit. Returns its table."""
    prefix = mgr.match_prefix(r) if use_prefix else None
    start = prefix.num_tokens if prefix is not None else 0
    ids = mgr.allocate_slots(r, r.num_tokens - start, prefix)
    assert ids is not None
    r.num_computed_tokens = r.num_tokens
    mgr.commit(r)
    mgr.check_integrity()
    return list(ids)


def pool_snapshot(mgr: KVCacheManager) -> dict:
    pool = mgr.pool
    return {
        "free": free_ids(pool),
        "num_free": pool.num_free,
        "num_free_blocks": mgr.num_free_blocks,
        "blocks": [
            (b.block_id, b.ref_cnt, b.block_hash, b.parent_hash, b.token_ids, b.parent_ref, b.gen)
            for b in pool.blocks
        ],
        "cached": {h: sorted(bucket) for h, bucket in pool.cached.items()},
        "evictions": pool.num_evictions,
        "pending": list(mgr.pending_copies),
    }


def request_snapshot(mgr: KVCacheManager, requests: list[Request]) -> dict:
    owned = mgr.owned_blocks()
    return {
        "owners": {rid: ids_of(blocks) for rid, blocks in owned.items()},
        "tables": {rid: list(mgr.block_ids(rid)) for rid in owned},
        "requests": [
            (r.request_id, r.num_computed_tokens, list(r.block_hashes), list(r.all_token_ids))
            for r in requests
        ],
    }


# ---- BlockPool ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_blocks", [0, 1, -3])
def test_pool_needs_two_blocks(num_blocks):
    with pytest.raises(ValidationError) as ei:
        BlockPool(num_blocks)
    assert isinstance(ei.value, ValueError)
    assert ei.value.param == "num_blocks"
    assert ei.value.value == num_blocks
    assert "num_blocks" in str(ei.value)


def test_fresh_pool_hands_out_1_2_3():
    pool = BlockPool(8)
    assert pool.num_free == 7
    assert free_ids(pool) == [1, 2, 3, 4, 5, 6, 7]
    assert pool.null_block is pool.blocks[NULL_BLOCK_ID]
    assert pool.null_block.ref_cnt == 1
    assert ids_of(pool.allocate(1)) == [1]
    assert ids_of(pool.allocate(2)) == [2, 3]
    assert ids_of(pool.allocate(4)) == [4, 5, 6, 7]
    assert pool.num_free == 0
    assert free_ids(pool) == []
    assert [b.ref_cnt for b in pool.blocks] == [1] * 8
    assert [b.gen for b in pool.blocks] == [0] + [1] * 7


def test_smallest_pool_has_one_usable_block():
    pool = BlockPool(2)
    assert ids_of(pool.allocate(1)) == [1]
    assert pool.num_free == 0
    pool.free(pool.blocks[1:2])
    assert free_ids(pool) == [1]
    assert ids_of(pool.allocate(1)) == [1]
    assert pool.blocks[1].gen == 2


def test_unhashed_blocks_go_to_front_lifo():
    pool = BlockPool(8)
    b = pool.allocate(5)  # 1..5
    pool.free([b[1]])  # 2
    assert free_ids(pool) == [2, 6, 7]
    pool.free([b[3]])  # 4
    assert free_ids(pool) == [4, 2, 6, 7]
    assert pool.num_free == 4
    assert ids_of(pool.allocate(3)) == [4, 2, 6]
    assert free_ids(pool) == [7]
    assert pool.num_evictions == 0


def test_hashed_blocks_go_to_back_and_are_evicted_lazily():
    pool = BlockPool(8)
    b = pool.allocate(5)  # ids 1..5
    pool.cache_block(b[1], "h2", None, (20,), ("root", None, None))
    pool.cache_block(b[3], "h4", "h2", (40,), (2, 1))
    # Free tail first: 5 (plain) -> front, 4 (hashed) -> back, 3 -> front, 2 -> back, 1 -> front.
    pool.free(reversed(b))
    assert free_ids(pool) == [1, 3, 5, 6, 7, 4, 2]
    assert pool.num_free == 7
    # Lazy eviction: freed hashed blocks keep their hash and stay in the map.
    assert pool.blocks[4].block_hash == "h4" and pool.blocks[2].block_hash == "h2"
    assert set(pool.cached) == {"h2", "h4"}
    assert pool.lookup("h4") == {4: pool.blocks[4]}

    assert ids_of(pool.allocate(5)) == [1, 3, 5, 6, 7]
    assert pool.num_evictions == 0
    assert set(pool.cached) == {"h2", "h4"}

    assert ids_of(pool.allocate(1)) == [4]  # LRU: 4 was freed before 2
    assert pool.num_evictions == 1
    assert set(pool.cached) == {"h2"}
    assert pool.lookup("h4") is None
    blk4 = pool.blocks[4]
    assert (blk4.block_hash, blk4.parent_hash, blk4.token_ids, blk4.parent_ref) == (None,) * 4
    assert blk4.gen == 2

    assert ids_of(pool.allocate(1)) == [2]
    assert pool.num_evictions == 2
    assert pool.cached == {}
    assert pool.num_free == 0


def test_hash_bucket_holds_several_blocks_and_shrinks_on_eviction():
    pool = BlockPool(4)
    b = pool.allocate(3)
    pool.cache_block(b[0], "same", None, (1,), ("root", None, None))
    pool.cache_block(b[1], "same", None, (1,), ("root", None, None))
    assert sorted(pool.lookup("same")) == [1, 2]
    pool.free([b[0], b[1]])  # both hashed -> back, in this order
    assert free_ids(pool) == [1, 2]
    assert ids_of(pool.allocate(1)) == [1]
    assert sorted(pool.lookup("same")) == [2]
    assert ids_of(pool.allocate(1)) == [2]
    assert pool.lookup("same") is None
    assert pool.num_evictions == 2


def test_touch_and_shared_ref_counts():
    pool = BlockPool(6)
    b = pool.allocate(3)  # 1, 2, 3
    pool.cache_block(b[1], "h", None, (7,), ("root", None, None))
    pool.free([b[1]])
    assert free_ids(pool) == [4, 5, 2]
    # A hit on a free cached block pulls it out of the middle of the free list.
    pool.touch([b[1]])
    assert free_ids(pool) == [4, 5]
    assert b[1].ref_cnt == 1 and pool.num_free == 2
    # A hit on an in-use block only bumps its count.
    pool.touch([b[0], b[1]])
    assert (b[0].ref_cnt, b[1].ref_cnt) == (2, 2)
    assert pool.num_free == 2
    pool.free([b[0], b[1]])
    assert (b[0].ref_cnt, b[1].ref_cnt) == (1, 1)
    assert free_ids(pool) == [4, 5]
    pool.free([b[1], b[0]])
    assert free_ids(pool) == [1, 4, 5, 2]
    assert b[1].block_hash == "h"  # still cached, not re-evicted by touch/free
    assert pool.num_evictions == 0


def test_reset_prefix_cache_forgets_only_evictable_blocks():
    pool = BlockPool(6)
    b = pool.allocate(4)  # 1..4
    for i, blk in enumerate(b):
        pool.cache_block(blk, f"h{blk.block_id}", None, (i,), ("root", None, None))
    pool.free([b[3], b[1]])  # 4 and 2 become evictable; 1 and 3 stay in use
    assert free_ids(pool) == [5, 4, 2]
    assert pool.reset_prefix_cache() == 2
    assert set(pool.cached) == {"h1", "h3"}
    assert pool.blocks[4].block_hash is None and pool.blocks[2].block_hash is None
    assert pool.num_free == 3
    assert sorted(free_ids(pool)) == [2, 4, 5]
    # Plain blocks now: reused before anything else, and no eviction on reallocation.
    ev = pool.num_evictions
    got = ids_of(pool.allocate(3))
    assert sorted(got) == [2, 4, 5]
    assert pool.num_evictions == ev
    assert pool.reset_prefix_cache() == 0


# ---- KVCacheManager: free order through requests --------------------------------------------


def test_request_blocks_freed_tail_first():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    a = req("A", [10, 11, 12, 13, 14, 15, 16])  # 3 full blocks + 1 partial
    assert prefill(mgr, a) == [1, 2, 3, 4]
    hashed = [mgr.pool.blocks[i].block_hash for i in (1, 2, 3, 4)]
    assert all(h is not None for h in hashed[:3]) and hashed[3] is None
    assert [mgr.pool.blocks[i].token_ids for i in (1, 2, 3)] == [(10, 11), (12, 13), (14, 15)]
    mgr.free(a)
    mgr.check_integrity()
    # 4 (plain) to the front; 3, 2, 1 (hashed, tail first) to the back.
    assert free_ids(mgr.pool) == [4, 5, 6, 7, 3, 2, 1]
    assert mgr.num_free_blocks == 7
    assert mgr.block_ids("A") == []
    mgr.free(a)  # idempotent
    assert free_ids(mgr.pool) == [4, 5, 6, 7, 3, 2, 1]
    mgr.check_integrity()


def test_eviction_order_tail_before_head_and_lazy_hits():
    mgr = KVCacheManager(num_blocks=6, block_size=2)
    toks = [10, 11, 12, 13, 14, 15, 16]
    a = req("A", toks)
    assert prefill(mgr, a) == [1, 2, 3, 4]
    h1, h2, h3 = (mgr.pool.blocks[i].block_hash for i in (1, 2, 3))
    mgr.free(a)
    assert free_ids(mgr.pool) == [4, 5, 3, 2, 1]

    # Lazy eviction: a copy of A still hits all three freed blocks (never the last token).
    probe = req("probe", toks)
    m = mgr.match_prefix(probe)
    assert ids_of(m.blocks) == [1, 2, 3] and m.num_tokens == 6
    assert [b.ref_cnt for b in m.blocks] == [0, 0, 0]  # match takes no references
    assert free_ids(mgr.pool) == [4, 5, 3, 2, 1]

    b = req("B", [50, 51, 52, 53])  # 2 plain blocks: the two unhashed ones
    assert prefill(mgr, b, use_prefix=False) == [4, 5]
    assert mgr.pool.num_evictions == 0
    assert set(mgr.pool.cached) >= {h1, h2, h3}

    c = req("C", [60, 61])  # next block: A's tail (3) is evicted first
    assert prefill(mgr, c, use_prefix=False) == [3]
    assert mgr.pool.num_evictions == 1
    assert h3 not in mgr.pool.cached and h1 in mgr.pool.cached and h2 in mgr.pool.cached
    m = mgr.match_prefix(req("probe2", toks))
    assert ids_of(m.blocks) == [1, 2] and m.num_tokens == 4

    d = req("D", [70, 71])
    assert prefill(mgr, d, use_prefix=False) == [2]
    assert mgr.pool.num_evictions == 2
    assert h2 not in mgr.pool.cached and h1 in mgr.pool.cached
    assert ids_of(mgr.match_prefix(req("probe3", toks)).blocks) == [1]

    e = req("E", [80])
    assert prefill(mgr, e, use_prefix=False) == [1]
    assert mgr.pool.num_evictions == 3
    assert h1 not in mgr.pool.cached
    assert mgr.match_prefix(req("probe4", toks)).num_tokens == 0
    assert mgr.num_free_blocks == 0
    mgr.check_integrity()


def test_lru_across_requests_and_refresh_on_hit():
    mgr = KVCacheManager(num_blocks=10, block_size=1)
    a = req("A", [1, 2, 3, 4])  # blocks 1,2,3,4; 1..4 hashed after commit (4 tokens)
    b = req("B", [9, 8, 7])  # blocks 5,6,7
    assert prefill(mgr, a, use_prefix=False) == [1, 2, 3, 4]
    assert prefill(mgr, b, use_prefix=False) == [5, 6, 7]
    mgr.free(a)
    mgr.free(b)
    assert free_ids(mgr.pool) == [8, 9, 4, 3, 2, 1, 7, 6, 5]

    # A request sharing A's first two tokens hits blocks 1, 2, then frees them: they move to
    # the back (most recently used), behind B's blocks.
    c = req("C", [1, 2, 100])
    m = mgr.match_prefix(c)
    assert ids_of(m.blocks) == [1, 2]
    ids = mgr.allocate_slots(c, 1, m)
    assert ids == [1, 2, 8]
    c.num_computed_tokens = 3
    mgr.commit(c)
    mgr.free(c)
    mgr.check_integrity()
    assert free_ids(mgr.pool) == [9, 4, 3, 7, 6, 5, 8, 2, 1]

    x = req("X", list(range(500, 508)))
    assert prefill(mgr, x, use_prefix=False) == [9, 4, 3, 7, 6, 5, 8, 2]
    assert mgr.pool.num_evictions == 7  # every hashed one except block 9 (never hashed)
    assert ids_of(mgr.match_prefix(req("p", [1, 2, 3])).blocks) == [1]


# ---- KVCacheManager: allocate_slots ---------------------------------------------------------


def test_allocate_slots_returns_live_table():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    r = req("R", list(range(6)))
    ids = mgr.allocate_slots(r, 6)
    assert ids == [1, 2]
    assert mgr.block_ids("R") is ids
    r.num_computed_tokens = 6
    r.all_token_ids.append(6)
    again = mgr.allocate_slots(r, 1)  # token 6 still fits in block 2
    assert again is ids and ids == [1, 2]
    r.num_computed_tokens = 7
    r.all_token_ids.append(7)
    assert mgr.allocate_slots(r, 1) is ids and ids == [1, 2]
    r.num_computed_tokens = 8
    r.all_token_ids.append(8)
    assert mgr.allocate_slots(r, 1) is ids
    assert ids == [1, 2, 3]  # the list handed out first is updated in place
    mgr.check_integrity()


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("computed,new,lookahead", [(0, 1, 0), (0, 5, 3), (5, 1, 0), (7, 9, 2)])
def test_allocate_slots_block_count(block_size, computed, new, lookahead):
    mgr = KVCacheManager(num_blocks=64, block_size=block_size)
    r = req("R", list(range(computed + new)))
    if computed:
        assert mgr.allocate_slots(r, computed) is not None
        r.num_computed_tokens = computed
    ids = mgr.allocate_slots(r, new, None, lookahead)
    total = computed + new + lookahead
    want = (total + block_size - 1) // block_size
    assert ids == list(range(1, want + 1))
    assert mgr.num_free_blocks == 63 - want
    mgr.check_integrity()


def test_failed_allocation_of_running_request_changes_nothing():
    mgr = KVCacheManager(num_blocks=6, block_size=2)
    other = req("O", [1, 2, 3, 4, 5])
    assert prefill(mgr, other) == [1, 2, 3]
    mgr.free(other)  # blocks 1, 2 hashed (evictable), 3 plain
    r = req("R", [9, 9, 9])
    assert mgr.allocate_slots(r, 3) == [3, 4]
    r.num_computed_tokens = 3
    r.all_token_ids.extend([8] * 7)  # 10 tokens: would need 5 blocks, 3 more; 3 free
    before_pool, before_req = pool_snapshot(mgr), request_snapshot(mgr, [r, other])
    assert mgr.allocate_slots(r, 7, None, 2) is None  # 12 slots -> 6 blocks
    assert pool_snapshot(mgr) == before_pool
    assert request_snapshot(mgr, [r, other]) == before_req
    ids = mgr.allocate_slots(r, 7)  # exactly fits: evicts the two cached blocks, tail first
    assert ids == [3, 4, 5, 2, 1]
    assert mgr.pool.num_evictions == 2 and mgr.pool.cached == {}
    mgr.check_integrity()


def _setup_partially_held_prefix():
    """Pool of 7 usable blocks, block_size 2. A's prompt [10..16] is cached in blocks 1, 2, 3
    (all evictable); H holds blocks 1 and 2 through a prefix hit (plus its own block 4)."""
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    a = req("A", [10, 11, 12, 13, 14, 15, 16])
    assert prefill(mgr, a) == [1, 2, 3, 4]
    mgr.free(a)
    assert free_ids(mgr.pool) == [4, 5, 6, 7, 3, 2, 1]
    h = req("H", [10, 11, 12, 13, 99])
    m = mgr.match_prefix(h)
    assert ids_of(m.blocks) == [1, 2]
    assert mgr.allocate_slots(h, 1, m) == [1, 2, 4]
    h.num_computed_tokens = 5
    mgr.commit(h)
    mgr.check_integrity()
    assert free_ids(mgr.pool) == [5, 6, 7, 3]
    assert [mgr.pool.blocks[i].ref_cnt for i in range(8)] == [1, 1, 1, 0, 1, 0, 0, 0]
    return mgr, h


def test_evictable_prefix_hits_count_against_free_space():
    mgr, h = _setup_partially_held_prefix()
    # B hits blocks 1, 2 (held by H) and 3 (evictable): 13 tokens -> 7 blocks, 4 new; taking the
    # evictable hit costs a free block too: 4 + 1 = 5 > 4 free.
    b = req("B", [10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25, 26])
    m = mgr.match_prefix(b)
    assert ids_of(m.blocks) == [1, 2, 3] and m.num_tokens == 6
    before = pool_snapshot(mgr)
    assert mgr.allocate_slots(b, b.num_tokens - m.num_tokens, m) is None
    assert pool_snapshot(mgr) == before
    assert mgr.block_ids("H") == [1, 2, 4]
    assert mgr.block_ids("B") == []
    mgr.check_integrity()


def test_prefix_hits_held_by_others_are_free_of_charge():
    mgr, h = _setup_partially_held_prefix()
    # 11 tokens -> 6 blocks: 3 hits + 3 new; only hit block 3 is evictable: 3 + 1 = 4 <= 4.
    b = req("B", [10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24])
    m = mgr.match_prefix(b)
    assert ids_of(m.blocks) == [1, 2, 3]
    ids = mgr.allocate_slots(b, b.num_tokens - m.num_tokens, m)
    assert ids == [1, 2, 3, 5, 6, 7]
    assert mgr.num_free_blocks == 0
    assert [mgr.pool.blocks[i].ref_cnt for i in range(8)] == [1, 2, 2, 1, 1, 1, 1, 1]
    assert mgr.pool.num_evictions == 0
    b.num_computed_tokens = m.num_tokens
    mgr.check_integrity()
    b.num_computed_tokens = b.num_tokens
    mgr.commit(b)
    mgr.check_integrity()
    # Block 3 (hit) and blocks 5, 6 (new, full) are now hashed under B's chain; 7 is partial.
    assert [mgr.pool.blocks[i].block_hash is not None for i in (3, 5, 6, 7)] == [
        True,
        True,
        True,
        False,
    ]
    assert [mgr.pool.blocks[i].token_ids for i in (5, 6)] == [(20, 21), (22, 23)]


def test_failed_admission_registers_nothing():
    """``allocate_slots`` documents "None when the pool is short; then nothing changed": a
    request whose very first allocation fails must not be left registered with the manager."""
    mgr = KVCacheManager(num_blocks=3, block_size=2)
    r = req("R", [1, 2, 3, 4, 5])  # 3 blocks > 2 usable
    m = mgr.match_prefix(r)
    assert m.num_tokens == 0
    before_pool, before_req = pool_snapshot(mgr), request_snapshot(mgr, [r])
    assert mgr.allocate_slots(r, 5, m) is None
    assert pool_snapshot(mgr) == before_pool
    assert "R" not in mgr.owned_blocks()
    assert request_snapshot(mgr, [r]) == before_req
    mgr.check_integrity()


def test_allocation_uses_every_usable_block_then_fails():
    for num_blocks in (2, 3, 17):
        mgr = KVCacheManager(num_blocks=num_blocks, block_size=1)
        r = req("R", list(range(num_blocks)))
        assert mgr.allocate_slots(r, num_blocks - 1) == list(range(1, num_blocks))
        r.num_computed_tokens = num_blocks - 1
        before = pool_snapshot(mgr)
        assert mgr.allocate_slots(r, 1) is None  # the null block is never handed out
        assert pool_snapshot(mgr) == before
        mgr.check_integrity()
        mgr.free(r)
        assert mgr.num_free_blocks == num_blocks - 1
        assert mgr.pool.null_block.ref_cnt == 1
        mgr.check_integrity()


@pytest.mark.parametrize("block_size", [0, -1, 2.0, "4", None])
def test_manager_rejects_bad_block_size(block_size):
    with pytest.raises(ValidationError) as ei:
        KVCacheManager(num_blocks=8, block_size=block_size)
    assert ei.value.param == "block_size"
    assert isinstance(ei.value, ValueError)


def test_manager_rejects_bad_hash_algo():
    with pytest.raises(ValidationError) as ei:
        KVCacheManager(num_blocks=8, block_size=4, hash_algo="md5")
    assert ei.value.param == "prefix_hash"
    assert "md5" in str(ei.value)


def test_manager_rejects_tiny_pool():
    with pytest.raises(ValidationError) as ei:
        KVCacheManager(num_blocks=1, block_size=4)
    assert ei.value.param == "num_blocks"


def test_blocks_needed_is_ceil_division():
    for bs in (1, 2, 3, 16):
        mgr = KVCacheManager(num_blocks=4, block_size=bs)
        for n in range(0, 50):
            want = 0
            while want * bs < n:
                want += 1
            assert mgr.blocks_needed(n) == want


def test_negative_token_counts_rejected_on_admission():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    r = req("R", [1, 2, 3])
    before = pool_snapshot(mgr)
    for n, la in ((-1, 0), (1, -1)):
        with pytest.raises(ValidationError) as ei:
            mgr.allocate_slots(r, n, None, la)
        assert "num_new_tokens" in ei.value.param or "num_lookahead_tokens" in ei.value.param
    assert pool_snapshot(mgr) == before
    assert "R" not in mgr.owned_blocks()


def test_negative_token_counts_rejected_for_running_request():
    """The same bad input must be rejected whatever the request's state (a running request
    whose table already has room must not silently accept ``num_new_tokens=-1``)."""
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    r = req("R", [1, 2, 3])
    assert mgr.allocate_slots(r, 3) == [1]
    r.num_computed_tokens = 2
    with pytest.raises(ValidationError):
        mgr.allocate_slots(r, -1)


def test_prefix_only_on_admission():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    a = req("A", [1, 2, 3, 4, 5])
    prefill(mgr, a)
    b = req("B", [1, 2, 3, 4, 5])
    m = mgr.match_prefix(b)
    assert ids_of(m.blocks) == [1, 2]
    assert mgr.allocate_slots(b, 1, m) == [1, 2, 4]
    b.num_computed_tokens = 5
    before = pool_snapshot(mgr)
    with pytest.raises(ValidationError) as ei:
        mgr.allocate_slots(b, 0, m)  # a second prefix for a request that holds blocks
    assert ei.value.param == "prefix"
    assert pool_snapshot(mgr) == before
    mgr.check_integrity()
