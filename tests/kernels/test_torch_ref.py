"""Reference kernels (kernels/torch_ref.py) against an independent float64 oracle.

The oracle gathers each sequence's K/V position by position from the Python list of its block
ids (not through the block table tensor), builds the causal mask from explicit positions, expands
GQA heads with ``repeat_interleave`` and computes in float64. Cache slots that no sequence owns
(the null block, the unused tail of each last block, spare blocks) hold NaN, so any read past a
sequence's length poisons the output.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.torch_ref import (
    dense_causal_attention,
    paged_attention,
    paged_decode,
    write_kv,
)
from layerzero_serve.kv_cache._storage import build_block_table, build_slot_mapping

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (atol, rtol) of outputs in the given dtype vs the float64 oracle on the same (rounded) inputs:
# float32 compute error plus one rounding of the output.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# (num_q_heads, num_kv_heads, head_dim): GQA ratios 1, 4, 8 and head dims 64, 128, 16.
HEADS = [(4, 4, 64), (8, 2, 128), (8, 1, 16)]
BLOCK_SIZES = [1, 16]
KINDS = ["decode", "prefill", "extend", "chunk", "mixed"]
MAX_KV = 300
WORK_BUDGET = 60_000  # sum of q_len * kv_len per batch


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bitwise comparisons (NaN-safe)."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(int_dtype)


# --------------------------------------------------------------------------- batch building


@dataclass
class Batch:
    query: torch.Tensor  # [T_total + pad, Hq, D]
    kv_cache: torch.Tensor  # [N, 2, bs, Hkv, D]
    meta: AttentionMetadata
    block_ids: list[list[int]]  # per sequence, in position order
    kv_lens: list[int]
    q_lens: list[int]
    keys: list[torch.Tensor]  # dense per-sequence K [kv_len, Hkv, D] in cache dtype
    values: list[torch.Tensor]


def make_batch(
    specs: list[tuple[int, int]],
    heads: tuple[int, int, int],
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    device: str = "cpu",
    pad_tokens: int = 0,
    spare_blocks: int = 3,
    table_width: int | None = None,
) -> Batch:
    """``specs``: (kv_len, q_len) per sequence. Blocks come from a shuffled pool (0 = null)."""
    hq, hkv, d = heads
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-kv // block_size) for kv, _ in specs]
    num_blocks = 1 + sum(need) + spare_blocks
    pool = list(range(1, num_blocks))
    rng.shuffle(pool)
    block_ids, pos = [], 0
    for n in need:
        block_ids.append(pool[pos : pos + n])
        pos += n

    cache = torch.full((num_blocks, 2, block_size, hkv, d), float("nan"), dtype=dtype)
    keys, values = [], []
    for (kv_len, _), ids in zip(specs, block_ids, strict=True):
        k = torch.randn(kv_len, hkv, d, generator=gen).to(dtype)
        v = torch.randn(kv_len, hkv, d, generator=gen).to(dtype)
        blk = torch.tensor([ids[p // block_size] for p in range(kv_len)], dtype=torch.long)
        off = torch.arange(kv_len) % block_size
        cache[blk, 0, off] = k
        cache[blk, 1, off] = v
        keys.append(k)
        values.append(v)

    kv_lens = [kv for kv, _ in specs]
    q_lens = [q for _, q in specs]
    total_q = sum(q_lens)
    query = torch.randn(total_q + pad_tokens, hq, d, generator=gen).to(dtype)
    query[total_q:] = float("nan")  # padding rows must never be read

    table = build_block_table(block_ids, table_width)
    starts = np.array(kv_lens, dtype=np.int64) - np.array(q_lens, dtype=np.int64)
    slots = build_slot_mapping(table, starts, np.array(q_lens, dtype=np.int64), block_size)
    slots = np.concatenate([slots, np.full(pad_tokens, -1, dtype=np.int32)])
    qsl = [0, *np.cumsum(q_lens).tolist()]
    meta = AttentionMetadata(
        num_seqs=len(specs),
        num_tokens=total_q + pad_tokens,
        block_size=block_size,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(table).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(kv_lens, default=0),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=kv_lens,
    )
    return Batch(
        query=query.to(device),
        kv_cache=cache.to(device),
        meta=meta,
        block_ids=block_ids,
        kv_lens=kv_lens,
        q_lens=q_lens,
        keys=keys,
        values=values,
    )


def make_specs(kind: str, block_size: int, seed: int) -> list[tuple[int, int]]:
    """(kv_len, q_len) pairs for a batch of 1..8 sequences of the given kind.

    Lengths always include the edges 1, a multiple of 16, one past a multiple of 16 and
    ``MAX_KV``; the total attention work (sum of q_len * kv_len) is capped at ``WORK_BUDGET`` by
    shortening later prefills and chunks, to keep the CPU run short.
    """
    rng = random.Random(seed)
    n = rng.randint(1, 8)
    edge = [MAX_KV, 16 * rng.randint(1, 18), 16 * rng.randint(1, 17) + 1, 1]
    kv_lens = [edge[i] if i < len(edge) else rng.randint(1, MAX_KV) for i in range(n)]
    specs, work = [], 0
    for kv in kv_lens:
        k = kind if kind != "mixed" else rng.choice(["decode", "prefill", "extend", "chunk"])
        left = max(WORK_BUDGET - work, 0)
        if k == "decode":
            q = 1
        elif k == "prefill":  # from scratch: q == kv
            kv = max(1, min(kv, math.isqrt(left)))
            q = kv
        elif k == "extend":  # cached prefix (prefix-cache hit) of any length, rest computed now
            q = kv - rng.randint(0, kv - 1)
        else:  # chunked prefill: earlier chunks of `chunk` tokens done, this chunk ends at kv
            q = min(kv, rng.choice([block_size, 7, 32, 64]))
        q = max(1, min(q, left // kv))
        work += q * kv
        specs.append((kv, q))
    rng.shuffle(specs)
    return specs


# --------------------------------------------------------------------------- float64 oracle


def oracle_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: list[int], scale: float
) -> torch.Tensor:
    """float64 ``[Lq, Hq, D]``: query j (at q_positions[j]) sees keys at positions <= it."""
    group = q.shape[1] // k.shape[1]
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    key_positions = torch.arange(k.shape[0])
    mask = key_positions[None, :] <= torch.tensor(q_positions, dtype=torch.long)[:, None]
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v64)


def gather_seq(cache: torch.Tensor, ids: list[int], kv_len: int) -> tuple[torch.Tensor, ...]:
    """K, V ``[kv_len, Hkv, D]`` read slot by slot from the sequence's block id list."""
    bs = cache.shape[2]
    blk = torch.tensor([ids[p // bs] for p in range(kv_len)], dtype=torch.long)
    off = torch.tensor([p % bs for p in range(kv_len)], dtype=torch.long)
    cpu = cache.cpu()
    return cpu[blk, 0, off], cpu[blk, 1, off]


def oracle_batch(b: Batch, scale: float | None = None) -> torch.Tensor:
    """float64 ``[T_total + pad, Hq, D]`` with zeros on padding rows."""
    d = b.query.shape[2]
    scale = d**-0.5 if scale is None else scale
    query = b.query.cpu()
    out = torch.zeros(query.shape, dtype=torch.float64)
    start = 0
    for ids, kv_len, q_len in zip(b.block_ids, b.kv_lens, b.q_lens, strict=True):
        k, v = gather_seq(b.kv_cache, ids, kv_len)
        q_pos = list(range(kv_len - q_len, kv_len))
        out[start : start + q_len] = oracle_attention(
            query[start : start + q_len], k, v, q_pos, scale
        )
        start += q_len
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual.cpu().double(), expected, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- paged_attention


def check_paged_attention(kind, heads, block_size, dtype, device="cpu"):
    seed = _seed(kind, heads, block_size, dtype)
    specs = make_specs(kind, block_size, seed)
    pad = 3 if kind in ("mixed", "decode") else 0
    b = make_batch(specs, heads, block_size, dtype, seed, device=device, pad_tokens=pad)
    out = paged_attention(b.query, b.kv_cache, b.meta)
    assert out.shape == b.query.shape and out.device == b.query.device
    assert_close(out, oracle_batch(b), dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_attention_matches_oracle(kind, heads, block_size, dtype):
    check_paged_attention(kind, heads, block_size, dtype)


def test_oracle_gather_sees_the_written_kv():
    """Sanity of the harness: the oracle's slot-by-slot gather returns what was stored."""
    b = make_batch([(37, 5), (16, 16), (1, 1)], (4, 2, 8), 16, torch.float32, 0)
    for ids, kv_len, k, v in zip(b.block_ids, b.kv_lens, b.keys, b.values, strict=True):
        gk, gv = gather_seq(b.kv_cache, ids, kv_len)
        assert torch.equal(gk, k) and torch.equal(gv, v)


def test_paged_attention_custom_scale_and_block_size_5():
    specs = [(23, 23), (41, 1), (10, 4)]
    b = make_batch(specs, (6, 3, 32), 5, torch.float32, 7, pad_tokens=2)
    out = paged_attention(b.query, b.kv_cache, b.meta, scale=0.3)
    assert_close(out, oracle_batch(b, scale=0.3), torch.float32)


def test_paged_attention_pad_rows_are_zero():
    b = make_batch([(20, 3), (5, 1)], (4, 1, 16), 16, torch.float16, 3, pad_tokens=5)
    out = paged_attention(b.query, b.kv_cache, b.meta)
    assert torch.isnan(b.query[4:]).all()  # the padding queries are NaN, yet:
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))


def test_paged_attention_empty_query_sequence_is_skipped():
    b = make_batch([(9, 0), (12, 12)], (2, 2, 8), 4, torch.float32, 5)
    assert_close(paged_attention(b.query, b.kv_cache, b.meta), oracle_batch(b), torch.float32)


def test_paged_attention_wide_block_table():
    """Extra null-block columns in the table are never read."""
    b = make_batch([(30, 30), (3, 1)], (4, 2, 16), 16, torch.float32, 11, table_width=6)
    assert_close(paged_attention(b.query, b.kv_cache, b.meta), oracle_batch(b), torch.float32)


def test_paged_attention_rejects_bad_shapes():
    b = make_batch([(8, 2)], (4, 2, 16), 4, torch.float32, 1)
    with pytest.raises(ValueError):
        paged_attention(b.query[:, :3], b.kv_cache, b.meta)  # 3 heads not a multiple of 2
    b.meta.seq_lens_cpu = [1]  # q_len 2 > seq_len 1
    with pytest.raises(ValueError):
        paged_attention(b.query, b.kv_cache, b.meta)


# --------------------------------------------------------------------------- paged_decode


def check_paged_decode(heads, block_size, dtype, device="cpu"):
    seed = _seed("decode", heads, block_size, dtype)
    specs = make_specs("decode", block_size, seed)
    width = -(-MAX_KV // block_size) + 2  # wider than any sequence needs
    b = make_batch(specs, heads, block_size, dtype, seed, device=device, table_width=width)
    m = b.meta
    out = paged_decode(b.query, b.kv_cache, m.block_tables, m.seq_lens)
    assert out.shape == b.query.shape and out.dtype == dtype
    assert_close(out, oracle_batch(b), dtype)
    ref = paged_attention(b.query, b.kv_cache, m)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)

    # Padding rows (seq_len 0, all-null table row) give zeros, wherever they sit.
    s = len(specs)
    pad_q = torch.randn(2, *b.query.shape[1:]).to(dtype).to(device)
    query = torch.cat([pad_q[:1], b.query, pad_q[1:]])
    zero_row = torch.zeros_like(m.block_tables[:1])
    tables = torch.cat([zero_row, m.block_tables, zero_row])
    zero_len = torch.zeros_like(m.seq_lens[:1])
    seq_lens = torch.cat([zero_len, m.seq_lens, zero_len])
    out_pad = paged_decode(query, b.kv_cache, tables, seq_lens)
    assert torch.equal(out_pad[0], torch.zeros_like(out_pad[0]))
    assert torch.equal(out_pad[s + 1], torch.zeros_like(out_pad[0]))
    torch.testing.assert_close(out_pad[1 : s + 1], out, atol=atol, rtol=rtol)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_paged_decode_matches_oracle_and_paged_attention(heads, block_size, dtype):
    check_paged_decode(heads, block_size, dtype)


def test_paged_decode_custom_scale():
    b = make_batch([(17, 1), (300, 1), (2, 1)], (8, 2, 64), 16, torch.float32, 9)
    m = b.meta
    out = paged_decode(b.query, b.kv_cache, m.block_tables, m.seq_lens, scale=0.05)
    assert_close(out, oracle_batch(b, scale=0.05), torch.float32)


# --------------------------------------------------------------------------- write_kv


def _random_cache(num_blocks, block_size, hkv, d, dtype, gen):
    return torch.randn(num_blocks, 2, block_size, hkv, d, generator=gen).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv_writes_exactly_the_given_slots(dtype, block_size):
    gen = torch.Generator().manual_seed(_seed("write", dtype, block_size))
    rng = random.Random(_seed("write", dtype, block_size))
    hkv, d, num_blocks = 2, 16, 12
    cache = _random_cache(num_blocks, block_size, hkv, d, dtype, gen)
    before = cache.clone()
    num_slots = num_blocks * block_size
    valid = rng.sample(range(num_slots), min(num_slots, 9))
    if 0 not in valid:
        valid[0] = 0  # slot 0 (the null block) as a real write, next to padding rows
    slots = list(valid)
    for pos in (0, 4, len(slots) + 2, len(slots) + 2):  # padding at start, middle and end
        slots.insert(pos, -1)
    t = len(slots)
    key = torch.randn(t, hkv, d, generator=gen).to(dtype)
    value = torch.randn(t, hkv, d, generator=gen).to(dtype)
    write_kv(key, value, cache, torch.tensor(slots, dtype=torch.int32))

    expected = before.clone()
    for i, s in enumerate(slots):
        if s >= 0:
            expected[s // block_size, 0, s % block_size] = key[i]
            expected[s // block_size, 1, s % block_size] = value[i]
    assert torch.equal(_bits(cache), _bits(expected))
    # Every slot not named keeps its bits.
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[torch.tensor(valid)] = False
    flat = lambda c: c.transpose(1, 2).reshape(num_slots, 2, hkv, d)  # noqa: E731
    assert torch.equal(_bits(flat(cache)[untouched]), _bits(flat(before)[untouched]))


def test_write_kv_all_padding_and_empty_change_nothing():
    gen = torch.Generator().manual_seed(0)
    cache = _random_cache(4, 16, 2, 8, torch.bfloat16, gen)
    cache[0, :, 0] = float("nan")  # even NaN bits at slot 0 must survive
    before = cache.clone()
    kv = torch.randn(5, 2, 8, generator=gen).to(torch.bfloat16)
    write_kv(kv, kv, cache, torch.full((5,), -1, dtype=torch.int32))
    assert torch.equal(_bits(cache), _bits(before))
    empty = torch.empty(0, 2, 8, dtype=torch.bfloat16)
    write_kv(empty, empty, cache, torch.empty(0, dtype=torch.int32))
    assert torch.equal(_bits(cache), _bits(before))


def test_write_kv_casts_to_cache_dtype_and_accepts_int64_slots():
    cache = torch.zeros(3, 2, 4, 1, 8, dtype=torch.float16)
    key = torch.randn(2, 1, 8)
    value = torch.randn(2, 1, 8)
    write_kv(key, value, cache, torch.tensor([5, -1], dtype=torch.int64))
    assert torch.equal(cache[1, 0, 1], key[0].half())
    assert torch.equal(cache[1, 1, 1], value[0].half())
    assert cache.count_nonzero() == 2 * 8


def test_write_kv_into_a_layer_view_of_a_stacked_cache():
    """A non-contiguous per-layer view (e.g. a K/V-interleaved allocation) is written in place."""
    big = torch.zeros(2, 2, 4, 3, 2, 8)  # [N, 2, 4 interleaved layers, bs, Hkv, D]
    layer = big[:, :, 1]  # [2, 2, 3, 2, 8], not contiguous
    assert not layer.is_contiguous()
    key = torch.randn(2, 2, 8)
    write_kv(key, -key, layer, torch.tensor([4, 0], dtype=torch.int32))
    assert torch.equal(big[1, 0, 1, 1], key[0]) and torch.equal(big[0, 1, 1, 0], -key[1])
    assert big.count_nonzero() == 4 * 2 * 8


def test_write_kv_fills_the_cache_like_the_explicit_layout():
    """write_kv over a whole batch's slot mapping reproduces the harness's explicit fill."""
    specs = [(40, 40), (17, 17), (1, 1)]
    b = make_batch(specs, (4, 2, 16), 16, torch.float32, 21, pad_tokens=3)
    cache = torch.full_like(b.kv_cache, float("nan"))
    key = torch.cat([*b.keys, torch.randn(3, 2, 16)])  # garbage on padding rows
    value = torch.cat([*b.values, torch.randn(3, 2, 16)])
    write_kv(key, value, cache, b.meta.slot_mapping)
    assert torch.equal(_bits(cache), _bits(b.kv_cache))


def test_prefill_chunks_then_decode_steps_end_to_end():
    """write_kv + paged_attention step by step equal dense attention on the whole sequence."""
    heads, bs, dtype = (8, 2, 32), 16, torch.float32
    total = 53
    gen = torch.Generator().manual_seed(4)
    q_all = torch.randn(total, heads[0], heads[2], generator=gen)
    k_all = torch.randn(total, heads[1], heads[2], generator=gen)
    v_all = torch.randn(total, heads[1], heads[2], generator=gen)
    ids = [5, 2, 7, 1]  # scattered
    cache = torch.full((9, 2, bs, heads[1], heads[2]), float("nan"), dtype=dtype)
    table = build_block_table([ids], 4)
    outs = []
    steps = [(0, 20), (20, 50), *[(p, p + 1) for p in range(50, total)]]  # 2 chunks, 3 decodes
    for start, end in steps:
        n = end - start
        slots = build_slot_mapping(table, np.array([start]), np.array([n]), bs)
        meta = AttentionMetadata(
            num_seqs=1,
            num_tokens=n,
            block_size=bs,
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            block_tables=torch.from_numpy(table),
            slot_mapping=torch.from_numpy(slots),
            max_query_len=n,
            max_seq_len=end,
            query_start_loc_cpu=[0, n],
            seq_lens_cpu=[end],
        )
        write_kv(k_all[start:end], v_all[start:end], cache, meta.slot_mapping)
        outs.append(paged_attention(q_all[start:end], cache, meta))
    got = torch.cat(outs)
    expected = oracle_attention(q_all, k_all, v_all, list(range(total)), heads[2] ** -0.5)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, dense_causal_attention(q_all, k_all, v_all))


# --------------------------------------------------------------------------- dense


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lens", [(1, 1), (37, 37), (5, 64)], ids=lambda x: f"q{x[0]}-k{x[1]}")
def test_dense_causal_attention_matches_oracle(heads, dtype, lens):
    hq, hkv, d = heads
    lq, lk = lens
    gen = torch.Generator().manual_seed(_seed("dense", heads, dtype, lens))
    q = torch.randn(lq, hq, d, generator=gen).to(dtype)
    k = torch.randn(lk, hkv, d, generator=gen).to(dtype)
    v = torch.randn(lk, hkv, d, generator=gen).to(dtype)
    out = dense_causal_attention(q, k, v)
    assert_close(out, oracle_attention(q, k, v, list(range(lk - lq, lk)), d**-0.5), dtype)


def test_dense_causal_attention_rejects_bad_gqa():
    with pytest.raises(ValueError):
        dense_causal_attention(torch.randn(4, 6, 8), torch.randn(4, 4, 8), torch.randn(4, 4, 8))


# --------------------------------------------------------------------------- CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_same_checks(dtype):
    for heads in HEADS:
        for block_size in BLOCK_SIZES:
            for kind in KINDS:
                check_paged_attention(kind, heads, block_size, dtype, device="cuda")
            check_paged_decode(heads, block_size, dtype, device="cuda")


@pytest.mark.gpu
@cuda
def test_cuda_graph_capture_write_kv_and_paged_decode():
    """write_kv and paged_decode capture into a CUDA graph and replay with new inputs."""
    heads, bs, dtype = (8, 2, 64), 16, torch.bfloat16
    b = make_batch([(33, 1), (300, 1), (16, 1)], heads, bs, dtype, 5, device="cuda")
    m = b.meta
    s, hq, d = b.query.shape
    hkv = heads[1]
    # Static buffers; the last row is a padding row (slot -1, seq_len 0).
    q_buf = torch.zeros(s + 1, hq, d, dtype=dtype, device="cuda")
    k_buf = torch.zeros(s + 1, hkv, d, dtype=dtype, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    slot_buf = torch.full((s + 1,), -1, dtype=torch.int32, device="cuda")
    table_buf = torch.cat([m.block_tables, torch.zeros_like(m.block_tables[:1])])
    len_buf = torch.zeros(s + 1, dtype=torch.int32, device="cuda")
    cache = b.kv_cache

    def step():
        write_kv(k_buf, v_buf, cache, slot_buf)
        return paged_decode(q_buf, cache, table_buf, len_buf)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture (writes nothing: all slots are -1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_buf = step()

    # Replay for the real decode step: overwrite the last position of each sequence.
    gen = torch.Generator().manual_seed(1)
    new_k = torch.randn(s, hkv, d, generator=gen).to(dtype).cuda()
    new_v = torch.randn(s, hkv, d, generator=gen).to(dtype).cuda()
    expected_cache = cache.clone()
    last = m.slot_mapping.long()
    expected_cache[last // bs, 0, last % bs] = new_k
    expected_cache[last // bs, 1, last % bs] = new_v
    q_buf[:s].copy_(b.query)
    k_buf[:s].copy_(new_k)
    v_buf[:s].copy_(new_v)
    k_buf[s] = float("nan")  # padding row garbage must not land anywhere
    slot_buf[:s].copy_(m.slot_mapping)
    len_buf[:s].copy_(m.seq_lens)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(_bits(cache), _bits(expected_cache))
    eager = paged_decode(b.query, cache, m.block_tables, m.seq_lens)
    assert torch.equal(out_buf[:s], eager)
    assert torch.equal(out_buf[s], torch.zeros_like(out_buf[s]))
