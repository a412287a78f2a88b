"""The Triton kernels (kernels/_triton/) against a float64 torch oracle written here.

The oracle gathers each sequence's K/V block by block from the Python list of its block ids
(never through the block table tensor), builds the causal mask from explicit positions and
computes in float64. Blocks come from a shuffled pool; every cache slot no sequence owns (the
null block, the tail of each last block, spare blocks) holds NaN, so a read past a sequence's
length poisons the output.

Without CUDA the kernels run under Triton's interpreter (tests/kernels/conftest.py sets
``TRITON_INTERPRET=1``) on a small grid; the ``gpu`` tests cover the large grid, CUDA graphs and
long contexts on a real device.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from layerzero_serve.kernels import torch_ref  # noqa: E402
from layerzero_serve.kernels._triton.backend import SPECS, TritonPagedAttention  # noqa: E402
from layerzero_serve.kernels._triton.kv_write import triton_write_kv  # noqa: E402
from layerzero_serve.kernels._triton.paged_decode import (  # noqa: E402
    choose_num_splits,
    triton_paged_decode,
)
from layerzero_serve.kernels._triton.paged_prefill import triton_paged_prefill  # noqa: E402
from layerzero_serve.kernels.metadata import AttentionMetadata  # noqa: E402
from layerzero_serve.kernels.spec import KernelContext, Op  # noqa: E402
from layerzero_serve.kv_cache._storage import build_block_table  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
CPU = "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# (atol, rtol) vs the float64 oracle on the same rounded inputs: fp32 accumulation plus one
# rounding of the output (bf16 a little more: the probabilities are rounded to bf16 for the
# P @ V product, as on tensor cores, and the interpreter truncates fp32 -> bf16 where a GPU
# rounds to nearest even).
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bitwise comparisons (NaN-safe)."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(int_dtype)


# --------------------------------------------------------------------------- batch building


@dataclass
class Case:
    query: torch.Tensor  # [T + pad, Hq, D]
    kv_cache: torch.Tensor  # [N, 2, bs, Hkv, D]
    meta: AttentionMetadata
    block_ids: list[list[int]]  # per sequence, in position order
    kv_lens: list[int]
    q_lens: list[int]


def make_case(
    specs: list[tuple[int, int]],
    heads: tuple[int, int, int],
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    device: str = CPU,
    pad_tokens: int = 0,
    spare_blocks: int = 2,
    table_width: int | None = None,
) -> Case:
    """``specs``: (kv_len, q_len) per sequence; the K/V of all ``kv_len`` positions is already in
    the cache (as after ``write_kv``). Blocks come from a shuffled pool; block 0 is the null
    block. Padding query rows are NaN and must never be read."""
    hq, hkv, d = heads
    rng = random.Random(seed)
    need = [-(-kv // block_size) for kv, _ in specs]
    num_blocks = 1 + sum(need) + spare_blocks
    pool = list(range(1, num_blocks))
    rng.shuffle(pool)
    block_ids, pos = [], 0
    for n in need:
        block_ids.append(pool[pos : pos + n])
        pos += n

    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device).to(dtype)  # noqa: E731
    cache = torch.full(
        (num_blocks, 2, block_size, hkv, d), float("nan"), dtype=dtype, device=device
    )
    for (kv_len, _), ids in zip(specs, block_ids, strict=True):
        pos = torch.arange(kv_len)
        blk = torch.tensor(ids, dtype=torch.long)[pos // block_size].to(device)
        cache[blk, :, (pos % block_size).to(device)] = randn(kv_len, 2, hkv, d)

    kv_lens = [kv for kv, _ in specs]
    q_lens = [q for _, q in specs]
    total_q = sum(q_lens)
    query = randn(total_q + pad_tokens, hq, d)
    query[total_q:] = float("nan")

    table = build_block_table(block_ids, table_width)
    slots = []
    for ids, kv_len, q_len in zip(block_ids, kv_lens, q_lens, strict=True):
        slots += [
            ids[p // block_size] * block_size + p % block_size
            for p in range(kv_len - q_len, kv_len)
        ]
    slots += [-1] * pad_tokens
    qsl = [0, *np.cumsum(q_lens).tolist()]
    meta = AttentionMetadata(
        num_seqs=len(specs),
        num_tokens=total_q + pad_tokens,
        block_size=block_size,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(table).to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int32, device=device),
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(kv_lens, default=0),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=kv_lens,
        block_tables_cpu=table,
    )
    return Case(query, cache, meta, block_ids, kv_lens, q_lens)


# --------------------------------------------------------------------------- float64 oracle


def gather_seq(cache: torch.Tensor, ids: list[int], kv_len: int) -> tuple[torch.Tensor, ...]:
    """K, V ``[kv_len, Hkv, D]``: the sequence's blocks, in list order, concatenated."""
    blocks = cache[torch.tensor(ids, dtype=torch.long, device=cache.device)]  # [nb, 2, bs, ..]
    flat = blocks.transpose(0, 1).reshape(2, -1, *cache.shape[3:])  # [2, nb * bs, Hkv, D]
    return flat[0, :kv_len], flat[1, :kv_len]


def oracle(
    query: torch.Tensor,
    cache: torch.Tensor,
    block_ids: list[list[int]],
    kv_lens: list[int],
    q_lens: list[int],
    scale: float | None = None,
) -> torch.Tensor:
    """float64 ``[T, Hq, D]`` on the query's device; query ``j`` of sequence ``i`` sits at
    position ``kv_len - q_len + j`` and sees keys at positions ``<=`` it. Other rows: zeros."""
    hq, d = query.shape[1], query.shape[2]
    group = hq // cache.shape[3]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    start = 0
    for ids, kv_len, q_len in zip(block_ids, kv_lens, q_lens, strict=True):
        if q_len == 0 or kv_len == 0:
            start += q_len
            continue
        k, v = gather_seq(cache, ids, kv_len)
        k = k.double().repeat_interleave(group, dim=1)
        v = v.double().repeat_interleave(group, dim=1)
        q = query[start : start + q_len].double()
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        k_pos = torch.arange(kv_len, device=query.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start : start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        start += q_len
    return out


def oracle_case(c: Case, scale: float | None = None) -> torch.Tensor:
    return oracle(c.query, c.kv_cache, c.block_ids, c.kv_lens, c.q_lens, scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    assert actual.dtype == dtype
    assert not torch.isnan(actual).any()
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def decode_case(lens, heads, block_size, dtype, seed, device=CPU, width=None) -> Case:
    return make_case(
        [(n, 1) for n in lens], heads, block_size, dtype, seed, device, table_width=width
    )


def run_decode(c: Case, **kw) -> torch.Tensor:
    m = c.meta
    return triton_paged_decode(c.query, c.kv_cache, m.block_tables, m.seq_lens, **kw)


# =========================================================================== CPU grid (and GPU)

# (lens, (Hq, Hkv, D), block_size, dtype): lengths {1, 17, 33, 100} (not multiples of 16),
# GQA 1 and 4, head_dim 64 (one case 128, one 32), block sizes 1 and 16.
DECODE_CASES = [
    ([1, 17, 33, 100], (4, 4, 64), 16, torch.float32),
    ([100, 33], (8, 2, 64), 1, torch.float32),
    ([17, 100, 1], (8, 2, 64), 16, torch.bfloat16),
    ([33], (4, 1, 64), 1, torch.float16),
    ([100, 17], (8, 1, 64), 16, torch.bfloat16),  # GQA 8
    ([100, 1], (4, 1, 128), 16, torch.bfloat16),
    ([17, 33], (2, 2, 32), 16, torch.float16),
]


def _case_id(case) -> str:
    lens, (hq, hkv, d), bs, dtype = case
    return f"{'-'.join(map(str, lens))}_hq{hq}-hkv{hkv}-d{d}_bs{bs}_{str(dtype)[6:]}"


@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_decode_matches_oracle_with_and_without_splits(case):
    lens, heads, bs, dtype = case
    c = decode_case(lens, heads, bs, dtype, _seed("decode", case), width=-(-100 // bs) + 2)
    expected = oracle_case(c)
    one = run_decode(c, num_splits=1)
    assert one.shape == c.query.shape
    assert_close(one, expected, dtype)
    # 3 splits: with 64-token tiles a 100-token row uses two splits and leaves one empty.
    split = run_decode(c, num_splits=3)
    assert_close(split, expected, dtype)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(split, one, atol=atol, rtol=rtol)


def test_decode_zero_length_rows_give_zeros():
    """Padding rows (seq_len 0, null-block table row, NaN query) give exact zeros, with and
    without splits, wherever they sit, and leave the real rows unchanged."""
    c = decode_case([33, 100], (8, 2, 64), 16, torch.bfloat16, 5, width=8)
    m = c.meta
    nan_q = torch.full_like(c.query[:1], float("nan"))
    query = torch.cat([nan_q, c.query[:1], nan_q, c.query[1:]])
    z = torch.zeros_like(m.block_tables[:1])
    tables = torch.cat([z, m.block_tables[:1], z, m.block_tables[1:]])
    zl = torch.zeros_like(m.seq_lens[:1])
    seq_lens = torch.cat([zl, m.seq_lens[:1], zl, m.seq_lens[1:]])
    expected = oracle_case(c)
    for splits in (1, 4):
        out = triton_paged_decode(query, c.kv_cache, tables, seq_lens, num_splits=splits)
        assert torch.equal(out[0::2], torch.zeros_like(out[0::2]))
        assert_close(out[1::2], expected, torch.bfloat16)
    all_pad = triton_paged_decode(nan_q, c.kv_cache, z, zl, num_splits=2)
    assert torch.equal(all_pad, torch.zeros_like(all_pad))


@pytest.mark.parametrize("case", DECODE_CASES[:3] + DECODE_CASES[5:6], ids=_case_id)
def test_decode_fused_merge_equals_separate_merge_and_resets_its_counters(case):
    """The last split's merge (one launch) gives the separate merge kernel's output (same
    log-sum-exp sums; fp32 up to summation order), matches the float64 oracle, and leaves the
    device's counters at zero, so a second call (a graph replay) gives bitwise the same."""
    from layerzero_serve.kernels._triton.paged_decode import merge_counters

    lens, heads, bs, dtype = case
    c = decode_case(lens, heads, bs, dtype, _seed("fused", case), width=-(-100 // bs) + 2)
    for splits in (2, 3, 5):
        separate = run_decode(c, num_splits=splits, fused_merge=False)
        fused = run_decode(c, num_splits=splits)
        counters = merge_counters(c.query.device, 1)
        assert counters is not None and int(counters.abs().sum()) == 0
        assert_close(fused, oracle_case(c), dtype)
        atol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(fused.float(), separate.float(), atol=atol, rtol=atol)
        assert torch.equal(fused, run_decode(c, num_splits=splits))


def test_decode_merge_counters_capacity():
    """More (sequence, kv head) pairs than counters: None (the separate merge kernel)."""
    from layerzero_serve.kernels._triton.paged_decode import MAX_MERGE_COUNTERS, merge_counters

    cpu = torch.device(CPU)
    assert merge_counters(cpu, MAX_MERGE_COUNTERS) is not None
    assert merge_counters(cpu, MAX_MERGE_COUNTERS + 1) is None


def test_decode_reset_merge_counters_recovers_from_a_corrupted_count():
    """A counter left non-zero (e.g. two launches raced on one buffer) makes a split merge
    before the others are in; reset_merge_counters restores the correct output."""
    from layerzero_serve.kernels._triton.paged_decode import merge_counters, reset_merge_counters

    case_a, case_b = (
        decode_case([100, 90], (8, 2, 64), 16, torch.float32, s, width=9) for s in (11, 12)
    )
    good_b = run_decode(case_b, num_splits=3)
    run_decode(case_a, num_splits=3)  # its partials may be what case b's buffers start with
    counters = merge_counters(case_b.query.device, 1)
    counters[0] = 2  # stale: (sequence 0, kv head 0) looks complete to its first split
    bad_b = run_decode(case_b, num_splits=3)
    assert not torch.allclose(bad_b[0, :4], good_b[0, :4])  # merged without splits 1 and 2
    torch.testing.assert_close(bad_b[1], good_b[1], atol=0, rtol=0)  # other rows unaffected
    reset_merge_counters(case_b.query.device)
    assert int(counters.abs().sum()) == 0
    assert torch.equal(run_decode(case_b, num_splits=3), good_b)


def test_decode_custom_scale_and_odd_block_size():
    c = decode_case([17, 100, 2], (8, 2, 64), 5, torch.float32, 9)
    out = run_decode(c, scale=0.05, num_splits=2)
    assert_close(out, oracle_case(c, scale=0.05), torch.float32)


def test_decode_default_splits_come_from_shapes_not_values():
    assert choose_num_splits(64, 8, 4096, 132) == 1  # 512 programs fill the GPU already
    assert choose_num_splits(1, 8, 4096, 132) == 16  # capped by 4096 / 256
    assert choose_num_splits(1, 8, 200, 132) == 1  # too short to split
    assert choose_num_splits(1, 1, 1 << 20, 132) == 32  # MAX_SPLITS
    assert choose_num_splits(4, 0, 0, 8) == 1
    # Auto choice (bound from the table width) agrees with an explicit split count.
    c = decode_case([100, 1], (4, 1, 64), 1, torch.float32, 3, width=600)
    auto = run_decode(c)
    assert_close(auto, oracle_case(c), torch.float32)
    assert torch.equal(auto, run_decode(c, num_splits=choose_num_splits(2, 1, 600, 8)))
    assert torch.equal(auto, run_decode(c, max_seq_len_hint=600))


def test_decode_rejects_bad_head_dim_and_heads():
    c = decode_case([3], (4, 2, 48), 16, torch.float32, 1)
    with pytest.raises(AssertionError):
        run_decode(c)
    c = decode_case([3], (3, 2, 64), 16, torch.float32, 1)
    with pytest.raises(ValueError):
        run_decode(c)


# (kv_len, q_len) batches: full prefill, extend over a prefix hit, chunk, decode row, q_len 0;
# GQA 1/2/4/4, head_dim 64 (one case 128), block sizes 1 and 16.
PREFILL_CASES = [
    ([(100, 100)], (4, 4, 64), 16, torch.float32),
    ([(33, 17), (17, 1), (100, 36)], (8, 2, 64), 1, torch.float32),
    ([(17, 17), (1, 1), (100, 16)], (8, 2, 64), 16, torch.bfloat16),
    ([(100, 70), (9, 0), (33, 33)], (4, 1, 64), 16, torch.float16),
    ([(33, 5), (100, 1)], (8, 2, 128), 1, torch.bfloat16),
    # Query blocks whose last position starts a KV tile (64 = 1 + 63, 128 = 65 + 63).
    ([(66, 65), (130, 129)], (2, 1, 64), 16, torch.float32),
]


def _prefill_id(case) -> str:
    specs, (hq, hkv, d), bs, dtype = case
    s = "-".join(f"{kv}x{q}" for kv, q in specs)
    return f"{s}_hq{hq}-hkv{hkv}-d{d}_bs{bs}_{str(dtype)[6:]}"


@pytest.mark.parametrize("case", PREFILL_CASES, ids=_prefill_id)
def test_prefill_matches_oracle(case):
    specs, heads, bs, dtype = case
    c = make_case(specs, heads, bs, dtype, _seed("prefill", case), pad_tokens=3)
    out = triton_paged_prefill(c.query, c.kv_cache, c.meta)
    assert out.shape == c.query.shape
    assert_close(out, oracle_case(c), dtype)
    n = sum(c.q_lens)
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))  # padding rows (NaN queries)


def test_prefill_custom_scale_odd_block_size_and_larger_grid_bound():
    """A grid sized for a larger ``max_query_len`` (a graph bound) gives the same bits."""
    c = make_case([(23, 23), (41, 1), (10, 4)], (6, 3, 32), 5, torch.float32, 7, pad_tokens=2)
    out = triton_paged_prefill(c.query, c.kv_cache, c.meta, scale=0.3)
    assert_close(out, oracle_case(c, scale=0.3), torch.float32)
    wide = triton_paged_prefill(c.query, c.kv_cache, c.meta, scale=0.3, max_query_len=100)
    assert torch.equal(out, wide)


def _written(cache, before, slots, key, value, block_size):
    expected = before.clone()
    for i, s in enumerate(slots):
        if s >= 0:
            expected[s // block_size, 0, s % block_size] = key[i].to(cache.dtype)
            expected[s // block_size, 1, s % block_size] = value[i].to(cache.dtype)
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv_writes_exactly_the_given_slots(dtype, block_size):
    seed = _seed("write", dtype, block_size)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    hkv, d, num_blocks = 3, 64, 10
    cache = torch.randn(num_blocks, 2, block_size, hkv, d, generator=gen).to(dtype)
    cache[0, :, 0] = float("nan")  # NaN bits next to real writes must survive
    before = cache.clone()
    valid = rng.sample(range(1, num_blocks * block_size), 7)
    slots = list(valid)
    for pos in (0, 3, len(slots) + 2, len(slots) + 2):  # padding at start, middle, end
        slots.insert(pos, -1)
    key = torch.randn(len(slots), hkv, d, generator=gen).to(dtype)
    value = torch.randn(len(slots), hkv, d, generator=gen).to(dtype)
    triton_write_kv(key, value, cache, torch.tensor(slots, dtype=torch.int32))
    expected = _written(cache, before, slots, key, value, block_size)
    assert torch.equal(_bits(cache), _bits(expected))


def test_write_kv_strided_inputs_casts_and_padding_only():
    """K/V as slices of a fused QKV row, a per-layer view of a stacked cache, int64 slots, an
    fp32 -> fp16 cast (round to nearest even, as torch), and all-padding calls."""
    gen = torch.Generator().manual_seed(0)
    hkv, d, bs = 2, 32, 4
    qkv = torch.randn(5, (4 + 2 * hkv) * d, generator=gen)
    key = qkv[:, 4 * d : (4 + hkv) * d].view(5, hkv, d)
    value = qkv[:, (4 + hkv) * d :].view(5, hkv, d)
    assert not key.is_contiguous()
    big = torch.randn(6, 2, 3, bs, hkv, d, generator=gen).half()  # [N, 2, layers, bs, Hkv, D]
    layer = big[:, :, 1]
    before = big.clone()
    slots = [7, -1, 0, 22, -1]
    triton_write_kv(key, value, layer, torch.tensor(slots, dtype=torch.int64))
    expected = before.clone()
    expected[:, :, 1] = _written(layer, before[:, :, 1], slots, key, value, bs)
    assert torch.equal(_bits(big), _bits(expected))

    snapshot = big.clone()
    triton_write_kv(key, value, layer, torch.full((5,), -1, dtype=torch.int32))
    empty = key[:0]
    triton_write_kv(empty, empty, layer, torch.empty(0, dtype=torch.int32))
    assert torch.equal(_bits(big), _bits(snapshot))


# --------------------------------------------------------------------------- backend


def test_backend_decode_and_mixed_batches_match_oracle():
    impl = TritonPagedAttention(KernelContext(Op.ATTN_DECODE, dtype="float32", head_dim=64))
    for specs in ([(17, 1), (100, 1), (1, 1)], [(33, 9), (17, 1), (40, 40)]):
        c = make_case(specs, (4, 2, 64), 16, torch.float32, _seed("backend", specs))
        # Clear this step's slots, then let the adapter write them back.
        hkv, d = 2, 64
        n = sum(c.q_lens)
        slots = c.meta.slot_mapping.long()
        blk, off = slots // 16, slots % 16
        key, value = c.kv_cache[blk, 0, off].clone(), c.kv_cache[blk, 1, off].clone()
        expected_cache = c.kv_cache.clone()
        c.kv_cache[blk, :, off] = torch.zeros(n, 2, hkv, d)
        impl.plan(c.meta)
        impl.write_kv(key, value, c.kv_cache, c.meta)
        assert torch.equal(_bits(c.kv_cache), _bits(expected_cache))
        out = impl.run(c.query, c.kv_cache, c.meta)
        assert_close(out, oracle_case(c), torch.float32)
        ref = torch_ref.paged_attention(c.query, c.kv_cache, c.meta)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_specs_are_well_formed():
    by_op = {s.op: s for s in SPECS}
    assert set(by_op) == {Op.ATTN_DECODE, Op.ATTN_PREFILL, Op.ATTN_VERIFY, Op.KV_WRITE}
    assert len({s.name for s in SPECS}) == len(SPECS)
    for s in SPECS:
        assert s.backend == "triton" and s.name.startswith("triton.")
        assert s.device_types == frozenset({"cuda"}) and s.min_sm == 80
        # decode ranks above FlashInfer's (100): same kernel with graphs on and off, no host
        # plan; the others rank below the vendor libraries
        assert (s.priority > 100) if s.op == Op.ATTN_DECODE else (0 < s.priority < 100)
        assert {"float16", "bfloat16", "float32"} == s.dtypes and {64, 128} <= s.head_dims
        assert s.factory is not None
    assert by_op[Op.ATTN_DECODE].graph_safe and by_op[Op.KV_WRITE].graph_safe
    assert not by_op[Op.ATTN_PREFILL].graph_safe
    ctx = KernelContext(Op.ATTN_DECODE, sm=90, dtype="bfloat16", head_dim=128, graph_mode=True)
    assert by_op[Op.ATTN_DECODE].supports(ctx) is None
    assert by_op[Op.ATTN_DECODE].supports(KernelContext(Op.ATTN_DECODE, sm=75)) is not None
    assert isinstance(by_op[Op.ATTN_DECODE].factory(ctx), TritonPagedAttention)


# =========================================================================== GPU grid

GPU_DTYPES = [torch.bfloat16, torch.float16]
GPU_HEADS = [(8, 8, 64), (32, 8, 128), (16, 4, 64), (32, 4, 128)]  # GQA 1, 4, 4, 8


def _gpu_lens(rng: random.Random, batch: int, max_len: int = 4096) -> list[int]:
    edge = [max_len, 1, 17, 16, 4095, 255, 257]
    return [edge[i] if i < len(edge) else rng.randint(1, max_len) for i in range(batch)]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("heads", GPU_HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_gpu_decode_grid(batch, heads, block_size, dtype):
    seed = _seed("gpu-decode", batch, heads, block_size, dtype)
    lens = _gpu_lens(random.Random(seed), batch)
    c = decode_case(
        lens, heads, block_size, dtype, seed, device="cuda", width=4096 // block_size + 1
    )
    expected = oracle_case(c)
    auto = run_decode(c)
    assert_close(auto, expected, dtype)
    for splits in (1, 8):  # split-KV and no split agree
        assert_close(run_decode(c, num_splits=splits), expected, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("heads", GPU_HEADS, ids=lambda h: f"hq{h[0]}-hkv{h[1]}-d{h[2]}")
@pytest.mark.parametrize("kind", ["prefill", "extend", "chunk", "mixed"])
def test_gpu_prefill_grid(kind, heads, block_size, dtype):
    seed = _seed("gpu-prefill", kind, heads, block_size, dtype)
    rng = random.Random(seed)
    n = {"prefill": 3, "extend": 8, "chunk": 16, "mixed": 64}[kind]
    specs = []
    for i, kv in enumerate(_gpu_lens(rng, n)):
        k = kind if kind != "mixed" else rng.choice(["decode", "extend", "chunk"])
        if k == "prefill":
            q = kv
        elif k == "extend":
            q = rng.randint(1, kv)
        elif k == "chunk":
            q = min(kv, rng.choice([16, 64, 100, 512]))
        else:
            q = 1
        if i == 0 and kind == "mixed":
            kv, q = 2000, 2000  # one long prefill among decodes
        specs.append((kv, q))
    c = make_case(specs, heads, block_size, dtype, seed, device="cuda", pad_tokens=5)
    out = triton_paged_prefill(c.query, c.kv_cache, c.meta)
    assert_close(out, oracle_case(c), dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_write_kv_skips_padding_bitwise(dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    num_blocks, bs, hkv, d = 64, 16, 8, 128
    cache = torch.randn(num_blocks, 2, bs, hkv, d, device="cuda", generator=gen).to(dtype)
    cache[0] = float("nan")
    before = cache.clone()
    slots = torch.randperm(num_blocks * bs, device="cuda", generator=gen)[:300].int()
    slots[::7] = -1
    key = torch.randn(300, hkv, d, device="cuda", generator=gen)  # fp32: cast on write
    value = torch.randn(300, hkv, d, device="cuda", generator=gen)
    triton_write_kv(key, value, cache, slots)
    ref = before.clone()
    torch_ref.write_kv(key, value, ref, slots)
    assert torch.equal(_bits(cache), _bits(ref))


@gpu
@needs_cuda
def test_gpu_split_kv_agrees_with_no_split_long_context():
    c = decode_case([4096, 3000, 1], (32, 8, 128), 16, torch.bfloat16, 3, device="cuda")
    one = run_decode(c, num_splits=1)
    for splits in (2, 7, 32):
        torch.testing.assert_close(run_decode(c, num_splits=splits), one, atol=1e-2, rtol=1e-2)
    assert_close(one, oracle_case(c), torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_fused_merge_equals_separate_merge_long_context():
    """On the GPU (real concurrency between splits): the last split's merge equals the separate
    merge kernel up to summation order, repeats bitwise, and leaves the counters zeroed."""
    from layerzero_serve.kernels._triton.paged_decode import merge_counters

    c = decode_case([4096, 3000, 1, 777], (32, 8, 128), 16, torch.bfloat16, 4, device="cuda")
    for splits in (2, 7, 32):
        separate = run_decode(c, num_splits=splits, fused_merge=False)
        fused = run_decode(c, num_splits=splits)
        torch.testing.assert_close(fused, separate, atol=1e-2, rtol=1e-2)
        for _ in range(20):
            assert torch.equal(run_decode(c, num_splits=splits), fused)
        assert int(merge_counters(c.query.device, 1).abs().sum()) == 0
    assert_close(fused, oracle_case(c), torch.bfloat16)


def _fresh_decode_inputs(rng, gen, bucket, n, width, bs, num_blocks, hq, hkv, d, dtype):
    """Random decode batch of ``n`` real rows padded to ``bucket``: host lists and tensors."""
    free = rng.sample(range(1, num_blocks), num_blocks - 1)
    lens = [rng.randint(1, width * bs) for _ in range(n)]
    ids, used = [], 0
    for L in lens:
        nb = -(-L // bs)
        ids.append(free[used : used + nb])
        used += nb
    table = torch.zeros(bucket, width, dtype=torch.int32)
    table[:n] = torch.from_numpy(build_block_table(ids, width))
    seq_lens = torch.zeros(bucket, dtype=torch.int32)
    seq_lens[:n] = torch.tensor(lens)
    slots = torch.full((bucket,), -1, dtype=torch.int32)
    slots[:n] = torch.tensor(
        [ids[i][(L - 1) // bs] * bs + (L - 1) % bs for i, L in enumerate(lens)]
    )
    q = torch.randn(bucket, hq, d, generator=gen).to(dtype)
    k = torch.randn(bucket, hkv, d, generator=gen).to(dtype)
    v = torch.randn(bucket, hkv, d, generator=gen).to(dtype)
    return ids, lens, [x.cuda() for x in (q, k, v, slots, table, seq_lens)]


@gpu
@needs_cuda
def test_gpu_cuda_graph_decode_replay_equals_eager_bitwise():
    """Capture write_kv + decode once; replay with new lengths, tables, slots and inputs: output
    and cache equal an eager run of the same padded batch bitwise, and match the oracle."""
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    bucket, width, bs, hq, hkv, d, dtype = 8, 64, 16, 32, 8, 128, torch.bfloat16
    num_blocks = bucket * width + 1
    cache = torch.randn(num_blocks, 2, bs, hkv, d, device="cuda").to(dtype)
    make = lambda n: _fresh_decode_inputs(  # noqa: E731
        rng, gen, bucket, n, width, bs, num_blocks, hq, hkv, d, dtype
    )
    _, _, static = make(bucket)
    q, k, v, slots, table, seq_lens = static

    def step():
        triton_write_kv(k, v, cache, slots)
        return triton_paged_decode(q, cache, table, seq_lens)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for n in (1, 5, 8, 3):
        ids, lens, new = make(n)
        for dst, src in zip(static, new, strict=True):
            dst.copy_(src)
        snapshot = cache.clone()
        graph.replay()
        got, got_cache = out.clone(), cache.clone()
        cache.copy_(snapshot)
        eager = step()
        torch.cuda.synchronize()
        assert torch.equal(_bits(got), _bits(eager))
        assert torch.equal(_bits(got_cache), _bits(cache))
        assert torch.equal(got[n:], torch.zeros_like(got[n:]))
        assert_close(got[:n], oracle(q[:n], got_cache, ids, lens, [1] * n), dtype)
        touched = torch.zeros(num_blocks * bs, dtype=torch.bool, device="cuda")
        touched[slots[:n].long()] = True
        flat = lambda c: c.transpose(1, 2).reshape(num_blocks * bs, -1)  # noqa: E731
        assert torch.equal(_bits(flat(got_cache)[~touched]), _bits(flat(snapshot)[~touched]))


@gpu
@needs_cuda
def test_gpu_cuda_graph_verify_replay_equals_eager_bitwise():
    """The verification plan (fixed k + 1 tokens per row) captured through the adapter: replay
    with new lengths, slots and inputs equals eager bitwise and matches the oracle."""
    k1, batch, bs, hq, hkv, d, dtype = 4, 4, 16, 16, 4, 128, torch.float16
    ctx = KernelContext(
        Op.ATTN_VERIFY, dtype="float16", head_dim=d, num_q_heads=hq, num_kv_heads=hkv,
        block_size=bs, batch_bucket=batch, q_len=k1, graph_mode=True,
    )  # fmt: skip
    impl = next(s for s in SPECS if s.op == Op.ATTN_VERIFY).factory(ctx)
    c = make_case([(300, k1)] * batch, (hq, hkv, d), bs, dtype, 0, device="cuda")
    c.kv_cache.copy_(torch.randn_like(c.kv_cache, dtype=torch.float32).to(dtype))
    m, cache = c.meta, c.kv_cache
    query = torch.randn_like(c.query)
    key = torch.randn(batch * k1, hkv, d, device="cuda", dtype=dtype)
    value = torch.randn_like(key)

    def step():
        impl.write_kv(key, value, cache, m)
        return impl.run(query, cache, m)

    impl.plan(m)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    rng = random.Random(1)
    for _ in range(3):
        lens = [rng.randint(k1, 300) for _ in range(batch)]
        slots = [
            ids[p // bs] * bs + p % bs
            for ids, L in zip(c.block_ids, lens, strict=True)
            for p in range(L - k1, L)
        ]
        m.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        m.slot_mapping.copy_(torch.tensor(slots, dtype=torch.int32))
        for t in (query, key, value):
            t.copy_(torch.randn_like(t))
        snapshot = cache.clone()
        graph.replay()
        got, got_cache = out.clone(), cache.clone()
        cache.copy_(snapshot)
        eager = step()
        torch.cuda.synchronize()
        assert torch.equal(_bits(got), _bits(eager))
        assert torch.equal(_bits(got_cache), _bits(cache))
        expected = oracle(query, got_cache, c.block_ids, lens, [k1] * batch)
        assert_close(got, expected, dtype)
