"""KV tensors and block-table metadata: sizes, validation, block copies, block tables and slot
mappings, each checked against a hand computation or a naive per-token Python loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import (
    KVCache,
    KVCacheSpec,
    build_block_table,
    build_positions,
    build_slot_mapping,
)

# Bytes per element, written down independently of torch.
ITEMSIZE = {
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.float32: 4,
    torch.float64: 8,
    torch.float8_e4m3fn: 1,
    torch.int8: 1,
}

# ---- KVCacheSpec ----------------------------------------------------------------------------


def test_bytes_per_block_llama3_8b():
    # 32 layers x (K, V) x 16 tokens x 8 kv heads x 128 dims x 2 bytes = 2 MiB.
    spec = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128)
    assert spec.block_size == 16 and spec.dtype == torch.float16
    assert spec.bytes_per_block == 2 * 1024 * 1024


@pytest.mark.parametrize("dtype", list(ITEMSIZE))
@pytest.mark.parametrize(
    "layers,heads,head_dim,block_size",
    [(1, 1, 1, 1), (2, 3, 5, 7), (28, 4, 64, 16), (80, 8, 128, 32), (1, 32, 256, 1)],
)
def test_bytes_per_block_arithmetic(dtype, layers, heads, head_dim, block_size):
    spec = KVCacheSpec(layers, heads, head_dim, block_size, dtype)
    want = layers * 2 * block_size * heads * head_dim * ITEMSIZE[dtype]
    assert spec.bytes_per_block == want
    assert isinstance(spec.bytes_per_block, int)


@pytest.mark.parametrize("k,rest", [(2, 0), (2, 1), (3, -1), (7, 0), (7, 12345), (1000, 3)])
def test_num_blocks_for_budget_floors(k, rest):
    spec = KVCacheSpec(2, 2, 8, 4, torch.float32)  # 2*2*4*2*8*4 = 1024 bytes per block
    assert spec.bytes_per_block == 1024
    budget = k * 1024 + rest
    want = budget // 1024
    assert spec.num_blocks_for_budget(budget) == want
    assert spec.num_blocks_for_budget(float(budget)) == want


@pytest.mark.parametrize("budget", [-1, 0, 1, 1023, 1024, 2047])
def test_budget_below_two_blocks_is_rejected(budget):
    spec = KVCacheSpec(2, 2, 8, 4, torch.float32)  # 1024 bytes per block
    with pytest.raises(ValidationError) as ei:
        spec.num_blocks_for_budget(budget)
    err = ei.value
    assert isinstance(err, ValueError)
    assert "bytes" in err.param
    assert err.value == budget
    assert "2048" in str(err)  # the smallest budget that works
    with pytest.raises(ValidationError):
        KVCache(spec, budget_bytes=budget)


# ---- KVCache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kv_cache_by_num_blocks(dtype):
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=dtype)
    cache = KVCache(spec, num_blocks=5)
    assert cache.num_blocks == 5 and cache.spec is spec
    assert len(cache.tensors) == 3
    for t in cache.tensors:
        assert tuple(t.shape) == (5, 2, 4, 2, 8)
        assert t.dtype == dtype and t.device.type == "cpu"
        assert t.is_contiguous()
        assert torch.count_nonzero(t).item() == 0
    assert len({t.data_ptr() for t in cache.tensors}) == 3  # one buffer per layer
    want_bytes = 3 * 5 * 2 * 4 * 2 * 8 * ITEMSIZE[dtype]
    assert cache.nbytes == want_bytes
    assert sum(t.numel() * t.element_size() for t in cache.tensors) == want_bytes


@pytest.mark.parametrize("extra", [0, 1, 1023])
def test_kv_cache_by_budget(extra):
    spec = KVCacheSpec(2, 2, 8, 4, torch.float32)  # 1024 bytes per block
    cache = KVCache(spec, budget_bytes=13 * 1024 + extra)
    assert cache.num_blocks == 13
    assert [tuple(t.shape) for t in cache.tensors] == [(13, 2, 4, 2, 8)] * 2
    assert cache.nbytes == 13 * 1024 <= 13 * 1024 + extra


@pytest.mark.parametrize("kwargs", [{}, {"num_blocks": 4, "budget_bytes": 1 << 20}])
def test_kv_cache_needs_exactly_one_size(kwargs):
    spec = KVCacheSpec(1, 1, 4, 4)
    with pytest.raises(ValidationError) as ei:
        KVCache(spec, **kwargs)
    assert isinstance(ei.value, ValueError)
    assert "num_blocks" in ei.value.param and "budget_bytes" in ei.value.param


@pytest.mark.parametrize("num_blocks", [1, 0, -5])
def test_kv_cache_needs_two_blocks(num_blocks):
    with pytest.raises(ValidationError) as ei:
        KVCache(KVCacheSpec(1, 1, 4, 4), num_blocks=num_blocks)
    assert ei.value.param == "num_blocks"
    assert ei.value.value == num_blocks
    assert "num_blocks" in str(ei.value)


@pytest.mark.parametrize(
    "field,bad,size",
    [
        ("num_layers", 0, {"num_blocks": 4}),  # would build a cache with no tensors at all
        ("head_dim", -8, {"num_blocks": 4}),
        ("head_dim", 0, {"budget_bytes": 1 << 20}),  # zero bytes per block
        ("block_size", -4, {"budget_bytes": 1 << 20}),  # negative bytes per block
    ],
)
def test_kv_cache_rejects_non_positive_dimensions(field, bad, size):
    """Bad inputs must raise a ValidationError (a ValueError) that names the parameter, not a
    ZeroDivisionError / torch error, and must never build a cache without storage."""
    dims = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4}
    dims[field] = bad
    with pytest.raises(ValidationError) as ei:
        KVCache(KVCacheSpec(**dims), **size)
    assert field in str(ei.value)


# ---- copy_blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_copy_blocks_exact(dtype):
    spec = KVCacheSpec(num_layers=2, num_kv_heads=3, head_dim=4, block_size=5, dtype=dtype)
    cache = KVCache(spec, num_blocks=8)
    gen = torch.Generator().manual_seed(0)
    for t in cache.tensors:
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    before = [t.clone() for t in cache.tensors]
    pairs = [(1, 6), (4, 2), (7, 5)]
    cache.copy_blocks(pairs)
    for layer, t in enumerate(cache.tensors):
        for b in range(8):
            src = {dst: src for src, dst in pairs}.get(b, b)
            assert torch.equal(t[b], before[layer][src]), (layer, b)
    # The sources are untouched, and no-op calls change nothing.
    snapshot = [t.clone() for t in cache.tensors]
    cache.copy_blocks([])
    assert all(torch.equal(a, b) for a, b in zip(cache.tensors, snapshot, strict=True))
    cache.copy_blocks([(3, 3)])
    assert all(torch.equal(a, b) for a, b in zip(cache.tensors, snapshot, strict=True))


def test_copy_blocks_random_pairs_match_loop():
    rng = random.Random(7)
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=2, block_size=3, dtype=torch.float32)
    cache = KVCache(spec, num_blocks=16)
    for t in cache.tensors:
        t.copy_(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape) + 0.5)
    for _ in range(30):
        ids = list(range(16))
        rng.shuffle(ids)
        k = rng.randint(1, 8)
        pairs = list(zip(ids[:k], ids[k : 2 * k], strict=True))  # disjoint srcs and dsts
        before = [t.clone() for t in cache.tensors]
        cache.copy_blocks(pairs)
        for layer, t in enumerate(cache.tensors):
            want = before[layer].clone()
            for src, dst in pairs:
                want[dst] = before[layer][src]
            assert torch.equal(t, want)


# ---- build_block_table --------------------------------------------------------------------


def test_block_table_pads_with_null_block():
    table = build_block_table([[5, 1, 9], [7], [], [2, 3]])
    assert table.dtype == np.int32
    assert table.tolist() == [[5, 1, 9], [7, 0, 0], [0, 0, 0], [2, 3, 0]]


def test_block_table_fixed_width():
    table = build_block_table([[5, 1], [7]], max_num_blocks=4)
    assert table.dtype == np.int32 and table.shape == (2, 4)
    assert table.tolist() == [[5, 1, 0, 0], [7, 0, 0, 0]]
    exact = build_block_table([[5, 1], [7]], max_num_blocks=2)
    assert exact.tolist() == [[5, 1], [7, 0]]


def test_block_table_too_narrow_is_rejected():
    with pytest.raises(ValidationError) as ei:
        build_block_table([[1, 2, 3], [4]], max_num_blocks=2)
    assert ei.value.param == "max_num_blocks"
    assert ei.value.value == 2
    assert "3" in ei.value.allowed


def test_block_table_empty():
    assert build_block_table([]).shape == (0, 0)
    t = build_block_table([], max_num_blocks=3)
    assert t.shape == (0, 3) and t.dtype == np.int32
    t = build_block_table([[], []])
    assert t.shape == (2, 0) and t.dtype == np.int32


def test_block_table_random_matches_loop():
    rng = random.Random(3)
    for _ in range(200):
        rows = [
            [rng.randrange(1, 1 << 20) for _ in range(rng.randint(0, 9))]
            for _ in range(rng.randint(0, 7))
        ]
        longest = max((len(r) for r in rows), default=0)
        width = None if rng.random() < 0.5 else longest + rng.randint(0, 3)
        table = build_block_table(rows, width)
        w = longest if width is None else width
        want = [r + [0] * (w - len(r)) for r in rows]
        assert table.dtype == np.int32
        assert table.shape == (len(rows), w)
        assert table.tolist() == want


# ---- build_positions / build_slot_mapping -------------------------------------------------


def naive_slots(rows, starts, lens, block_size):
    out = []
    for row, start, n in zip(rows, starts, lens, strict=True):
        for pos in range(start, start + n):
            out.append(row[pos // block_size] * block_size + pos % block_size)
    return out


def naive_positions(starts, lens):
    seq, pos = [], []
    for i, (start, n) in enumerate(zip(starts, lens, strict=True)):
        seq.extend([i] * n)
        pos.extend(range(start, start + n))
    return seq, pos


def random_batch(rng: random.Random, block_size: int, num_blocks: int = 4096):
    rows, starts, lens = [], [], []
    for _ in range(rng.randint(1, 8)):
        ntok = rng.randint(0, 5 * block_size + 3)  # often not a multiple of block_size
        nblk = -(-ntok // block_size)
        rows.append(rng.sample(range(1, num_blocks), nblk))
        start = rng.randint(0, ntok)
        starts.append(start)
        lens.append(ntok - start if rng.random() < 0.5 else rng.randint(0, ntok - start))
    return rows, starts, lens


def test_slot_mapping_hand_example():
    bs = 4
    rows = [[7, 3], [9], [2, 5, 8]]
    table = build_block_table(rows)
    starts = np.array([2, 0, 7])
    lens = np.array([4, 1, 3])
    slots = build_slot_mapping(table, starts, lens, bs)
    assert slots.dtype == np.int32
    # seq 0: positions 2,3 (block 7) then 4,5 (block 3); seq 1: position 0 (block 9);
    # seq 2: position 7 (block 5), 8, 9 (block 8).
    assert slots.tolist() == [30, 31, 12, 13, 36, 23, 32, 33]


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
def test_slot_mapping_matches_loop(block_size, index_dtype):
    rng = random.Random(block_size * 101 + (index_dtype is np.int32))
    for _ in range(150):
        rows, starts, lens = random_batch(rng, block_size)
        padded = build_block_table(rows, max(len(r) for r in rows) + rng.randint(0, 2))
        s = np.array(starts, dtype=index_dtype)
        n = np.array(lens, dtype=index_dtype)
        slots = build_slot_mapping(padded, s, n, block_size)
        assert slots.dtype == np.int32
        assert slots.tolist() == naive_slots(rows, starts, lens, block_size)
        seq, pos = build_positions(s, n)
        want_seq, want_pos = naive_positions(starts, lens)
        assert seq.tolist() == want_seq and pos.tolist() == want_pos


def test_slot_mapping_empty_batch_pieces():
    table = build_block_table([[4], [6, 1]])
    slots = build_slot_mapping(table, np.array([0, 3]), np.array([0, 0]), 2)
    assert slots.dtype == np.int32 and slots.tolist() == []
    slots = build_slot_mapping(table, np.array([1, 3]), np.array([0, 1]), 2)
    assert slots.tolist() == [1 * 2 + 1]


@settings(max_examples=150, deadline=None, database=None)
@given(block_size=st.integers(1, 17), num_seqs=st.integers(1, 6), data=st.data())
def test_slot_mapping_property(block_size, num_seqs, data):
    rows, starts, lens = [], [], []
    for _ in range(num_seqs):
        ntok = data.draw(st.integers(0, 40))
        start = data.draw(st.integers(0, ntok))
        n = data.draw(st.integers(0, ntok - start))
        nblk = -(-ntok // block_size)
        rows.append(data.draw(st.lists(st.integers(1, 100_000), min_size=nblk, max_size=nblk)))
        starts.append(start)
        lens.append(n)
    table = build_block_table(rows)
    slots = build_slot_mapping(table, np.array(starts), np.array(lens), block_size)
    assert slots.dtype == np.int32
    assert slots.tolist() == naive_slots(rows, starts, lens, block_size)
