"""KV cache inputs (pool, manager, tensors, block-table helpers) are validated: a bad value raises
a ValidationError naming the parameter; valid values keep working."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import (
    BlockPool,
    KVCache,
    KVCacheManager,
    KVCacheSpec,
    build_block_table,
    build_positions,
    build_slot_mapping,
)
from layerzero_serve.kv_cache._block_pool import MAX_NUM_BLOCKS
from layerzero_serve.types import Request

BIG = 2**70


def _spec() -> KVCacheSpec:
    return KVCacheSpec(2, 2, 8, 4, torch.float32)  # 1024 bytes per block


# ---- KVCacheManager / BlockPool ----------------------------------------------------------------


@pytest.mark.parametrize(
    "num_blocks", ["x", None, math.nan, math.inf, 8.0, True, 1, 0, -3, BIG, MAX_NUM_BLOCKS + 1]
)
def test_manager_rejects_bad_num_blocks_quickly(num_blocks):
    t0 = time.perf_counter()
    with pytest.raises(ValidationError, match="num_blocks") as ei:
        KVCacheManager(num_blocks, 4)
    assert ei.value.param == "num_blocks"
    with pytest.raises(ValidationError, match="num_blocks"):
        BlockPool(num_blocks)
    assert time.perf_counter() - t0 < 1.0  # no per-block work before the check


@pytest.mark.parametrize("block_size", [True, False, 1.5, "4", None, 0, -1, BIG])
def test_manager_rejects_bad_block_size(block_size):
    with pytest.raises(ValidationError, match="block_size"):
        KVCacheManager(8, block_size)


@pytest.mark.parametrize("hash_algo", [["sha256"], None, 5, "md5", {}])
def test_manager_rejects_bad_hash_algo(hash_algo):
    with pytest.raises(ValidationError, match="prefix_hash"):
        KVCacheManager(8, 4, hash_algo=hash_algo)


@pytest.mark.parametrize("hash_fn", [5, "sha256", [lambda p, t: 0]])
def test_manager_rejects_non_callable_hash_fn(hash_fn):
    with pytest.raises(ValidationError, match="hash_fn"):
        KVCacheManager(8, 4, hash_fn=hash_fn)


@pytest.mark.parametrize("flag", ["x", None, 1])
def test_manager_rejects_non_bool_prefix_caching(flag):
    with pytest.raises(ValidationError, match="enable_prefix_caching"):
        KVCacheManager(8, 4, enable_prefix_caching=flag)


@pytest.mark.parametrize(
    ("n", "lookahead"), [(1.5, 0), ("1", 0), (None, 0), (True, 0), (1, 0.5), (1, True), (-1, 0)]
)
def test_allocate_slots_rejects_bad_counts(n, lookahead):
    mgr = KVCacheManager(8, 4)
    r = Request("a", [1, 2, 3], max_tokens=4)
    with pytest.raises(ValidationError, match="num_new_tokens"):
        mgr.allocate_slots(r, n, None, lookahead)
    assert mgr.num_free_blocks == 7  # nothing changed
    mgr.allocate_slots(r, 3)
    r.num_computed_tokens = 3
    with pytest.raises(ValidationError, match="num_new_tokens"):  # the fast path checks too
        mgr.allocate_slots(r, n, None, lookahead)
    mgr.check_integrity()


def test_manager_keeps_valid_values():
    mgr = KVCacheManager(np.int64(16), np.int32(4), False, "fast", hash_fn=None)
    assert mgr.num_blocks == 16 and mgr.block_size == 4 and type(mgr.block_size) is int
    mgr = KVCacheManager(2, 1, True, "sha256", hash_fn=lambda parent, toks: 0)
    assert mgr.num_usable_blocks == 1
    mgr = KVCacheManager(32, 4)
    r = Request("a", [1, 2, 3, 4, 5], max_tokens=4)
    assert mgr.allocate_slots(r, np.int64(5), None, np.int32(2)) == [1, 2]
    r.num_computed_tokens = 5
    assert mgr.allocate_slots(r, 1) == [1, 2]
    assert mgr.allocate_slots(r, 0, None, 0) == [1, 2]
    mgr.check_integrity()


# ---- KVCacheSpec / KVCache -------------------------------------------------------------------


@pytest.mark.parametrize("budget", [math.nan, math.inf, -math.inf, "x", None, True, [1 << 20]])
def test_budget_must_be_a_finite_number(budget):
    spec = _spec()
    with pytest.raises(ValidationError, match="budget_bytes"):
        spec.num_blocks_for_budget(budget)
    if budget is not None:  # None means "no budget given" to KVCache
        with pytest.raises(ValidationError, match="budget_bytes"):
            KVCache(spec, budget_bytes=budget)


def test_huge_budget_is_capped_at_the_largest_pool():
    spec = _spec()
    assert spec.num_blocks_for_budget(BIG) == MAX_NUM_BLOCKS
    assert spec.num_blocks_for_budget(float(1 << 40)) == MAX_NUM_BLOCKS
    assert spec.num_blocks_for_budget(5 * 1024 + 7) == 5
    assert spec.num_blocks_for_budget(5 * 1024.0) == 5


@pytest.mark.parametrize("num_blocks", ["x", math.nan, 4.0, True, 1, BIG, MAX_NUM_BLOCKS + 1])
def test_kv_cache_rejects_bad_num_blocks(num_blocks):
    with pytest.raises(ValidationError, match="num_blocks"):
        KVCache(_spec(), num_blocks=num_blocks)


def test_kv_cache_rejects_a_non_spec():
    with pytest.raises(ValidationError, match="spec"):
        KVCache((2, 2, 8, 4), num_blocks=4)


@pytest.mark.parametrize(
    "pairs",
    [
        [(1, 8)],
        [(8, 1)],
        [(-1, 2)],
        [(1, -8)],
        [(1, 2), (3, 2**40)],
        [(1.0, 2)],
        [(True, 2)],
        [(1, None)],
        [(1,)],
        [(1, 2, 3)],
        [5],
        ["ab"],
    ],
)
def test_copy_blocks_rejects_bad_block_ids_and_copies_nothing(pairs):
    cache = KVCache(_spec(), num_blocks=8)
    for t in cache.tensors:
        t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape))
    before = [t.clone() for t in cache.tensors]
    with pytest.raises(ValidationError, match="pairs"):
        cache.copy_blocks(pairs)
    assert all(torch.equal(a, b) for a, b in zip(cache.tensors, before, strict=True))


def test_copy_blocks_keeps_valid_pairs():
    cache = KVCache(_spec(), num_blocks=8)
    for t in cache.tensors:
        t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape))
    cache.copy_blocks([(1, 7), [np.int64(0), 3]])
    for t in cache.tensors:
        assert torch.equal(t[7], t[1]) and torch.equal(t[3], t[0])


# ---- block-table helpers -------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows", [[["a"]], [[2**40]], [[2**31]], [[None]], [[1, math.nan]], [[-1]], [[3, -7]], [5]]
)
def test_block_table_rejects_bad_ids(rows):
    with pytest.raises(ValidationError, match="block_ids"):
        build_block_table(rows)


@pytest.mark.parametrize("width", [-1, 1.5, True, "4", BIG])
def test_block_table_rejects_bad_width(width):
    with pytest.raises(ValidationError, match="max_num_blocks"):
        build_block_table([[1]], width)


def test_block_table_keeps_valid_input():
    table = build_block_table([[5, 1], [2**31 - 1], []], np.int64(3))
    assert table.tolist() == [[5, 1, 0], [2**31 - 1, 0, 0], [0, 0, 0]]
    assert build_block_table([(4, 0)]).tolist() == [[4, 0]]


@pytest.mark.parametrize(
    ("starts", "lens"),
    [
        ([0, 1], [1, 2, 3]),  # fewer starts than lens
        ([0, 1, 2], [1, 2]),  # more starts than lens (used to return a result silently)
        ([[0, 1]], [[1, 2]]),  # not 1-d
        ([0.0], [1]),
        ([0], [1.0]),
        ([0, 1], [1, -1]),  # negative length
    ],
)
def test_positions_and_slot_mapping_reject_inconsistent_inputs(starts, lens):
    s, n = np.asarray(starts), np.asarray(lens)
    with pytest.raises(ValidationError, match="starts|lens"):
        build_positions(s, n)
    table = build_block_table([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    with pytest.raises(ValidationError, match="starts|lens"):
        build_slot_mapping(table, s, n, 4)


@pytest.mark.parametrize("block_size", [0, -4, 1.5, True, "4", None])
def test_slot_mapping_rejects_bad_block_size(block_size):
    table = build_block_table([[1, 2]])
    with pytest.raises(ValidationError, match="block_size"):
        build_slot_mapping(table, np.array([0]), np.array([3]), block_size)


@pytest.mark.parametrize(
    ("starts", "lens"),
    [
        ([0], [9]),  # positions past the table's width
        ([0, 0], [1, 1]),  # more sequences than table rows
    ],
)
def test_slot_mapping_rejects_positions_outside_the_table(starts, lens):
    table = build_block_table([[1, 2]])
    with pytest.raises(ValidationError, match="starts/lens"):
        build_slot_mapping(table, np.array(starts), np.array(lens), 4)


def test_positions_and_slot_mapping_keep_valid_input():
    table = build_block_table([[7, 3], [9]])
    seq, pos = build_positions(np.array([2, 0], dtype=np.int32), np.array([3, 1], dtype=np.int64))
    assert seq.tolist() == [0, 0, 0, 1] and pos.tolist() == [2, 3, 4, 0]
    slots = build_slot_mapping(table, np.array([2, 0]), np.array([3, 1]), np.int64(4))
    assert slots.tolist() == [30, 31, 12, 36]
    # lists are accepted as well as arrays; empty batches stay empty
    seq, pos = build_positions([1], [2])
    assert pos.tolist() == [1, 2]
    empty = build_slot_mapping(table[:0], np.array([], np.int64), np.array([], np.int64), 4)
    assert empty.tolist() == []
