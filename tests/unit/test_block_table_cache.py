"""BlockTableCache gives exactly build_block_table's table every step of a random run of
appends, trims and copy-on-write edits (reported through the edit counter), new and finished
requests and reordered, growing and shrinking batches; and it rewrites every row when the edit
counter is unknown or changed."""

from __future__ import annotations

import numpy as np
import pytest

from layerzero_serve.kv_cache import KVCacheManager, build_block_table
from layerzero_serve.kv_cache._storage import BlockTableCache
from layerzero_serve.types import Request


@pytest.mark.parametrize("seed", range(20))
def test_equals_a_full_rebuild_over_random_steps(seed):
    rng = np.random.default_rng(seed)
    cache = BlockTableCache(width=2, rows=2)  # small: it must grow
    live: list[list[int]] = [[1, 2], [3]]
    edits, next_id = 0, 100
    for _ in range(400):
        op = rng.integers(0, 7)
        i = int(rng.integers(0, len(live))) if live else 0
        if op <= 2 and live:  # the common case: a request gets one more block
            live[i].append(next_id)
            next_id += 1
        elif op == 3 and live and live[i]:  # speculative rollback: trim the tail
            del live[i][int(rng.integers(0, len(live[i]))) :]
            edits += 1
        elif op == 4 and live and live[i]:  # copy-on-write of one block, anywhere
            live[i][int(rng.integers(0, len(live[i])))] = next_id
            next_id += 1
            edits += 1
        elif op == 5:  # a new request (a fresh list), or one finishes
            if rng.random() < 0.6 or not live:
                live.insert(int(rng.integers(0, len(live) + 1)), [next_id])
                next_id += 1
            else:
                live.pop(i)
        else:  # the batch is reordered (rows move to other positions)
            rng.shuffle(live)
        reported = edits if rng.random() < 0.9 else -1
        got = cache.build(live, reported)
        want = build_block_table(live)
        assert got.dtype == np.int32 and np.array_equal(got, want)


def test_rows_follow_the_managers_edit_counter():
    kv = KVCacheManager(64, 4)
    reqs = [Request(f"r{i}", list(range(10 + i)), max_tokens=4) for i in range(3)]
    for r in reqs:
        assert kv.allocate_slots(r, len(r.all_token_ids), None, 0) is not None
    cache = BlockTableCache()
    lists = [kv.block_ids(r.request_id) for r in reqs]
    assert np.array_equal(cache.build(lists, kv.table_edits), build_block_table(lists))
    before = kv.table_edits
    reqs[1].num_computed_tokens = 5
    kv.trim(reqs[1], 5)  # gives blocks back: an edit
    assert kv.table_edits == before + 1
    r = reqs[1]
    assert kv.allocate_slots(r, len(r.all_token_ids) - 5, None, 0) is not None  # new blocks
    lists = [kv.block_ids(r.request_id) for r in reqs]
    assert np.array_equal(cache.build(lists, kv.table_edits), build_block_table(lists))


def test_the_result_is_a_copy():
    cache = BlockTableCache()
    a = [[1, 2, 3]]
    first = cache.build(a, 0)
    a[0].append(4)
    second = cache.build(a, 0)
    assert first.tolist() == [[1, 2, 3]] and second.tolist() == [[1, 2, 3, 4]]
