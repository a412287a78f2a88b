"""FP8 KV cache through the attention dispatch (``runner/_kv_fp8.py``): K/V are stored as
``x / scale`` in FP8 and the per-layer scales are folded into the query and the output.

Oracles: a float64 attention over the *dequantized* cache (``stored * scale``: the fold must be
exact up to float32 rounding), and a float64 attention over the unquantized K/V (the
quantization error itself, within a stated bound). Prefill, decode and several layers with
different scales; bad scales and unknown dtypes are clear errors."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kv_cache import KV_CACHE_DTYPES, KVCache, KVCacheSpec
from layerzero_serve.runner.attention import build_attention

HQ, HKV, D, BS = 6, 2, 32, 8


def _meta(query_lens, seq_lens, num_blocks_each=4):
    table = [
        [1 + i * num_blocks_each + j for j in range(num_blocks_each)] for i in range(len(seq_lens))
    ]
    return AttentionMetadata.from_host(query_lens, seq_lens, table, BS)


def _reference(q, k_all, v_all, seq_lens, query_lens):
    """float64 causal attention per sequence over K/V ``[S][L, Hkv, D]``."""
    out, start = [], 0
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens, strict=True)):
        qi = q[start : start + ql].double()
        out.append(torch_ref.dense_causal_attention(
            qi, k_all[i][:n].double(), v_all[i][:n].double(), compute_dtype=torch.float64
        ))  # fmt: skip
        start += ql
    return torch.cat(out)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_prefill_then_decode_match_the_dequantized_cache(kv_dtype):
    g = torch.Generator().manual_seed(1)
    spec = KVCacheSpec(2, HKV, D, BS, torch.float32, kv_dtype)
    cache = KVCache(spec, num_blocks=20)
    cache.set_scales([0.05, 2.0], [0.5, 0.02])  # two layers, very different ranges
    assert cache.tensors[0].dtype == KV_CACHE_DTYPES[kv_dtype]
    attn = build_attention(cache, HQ, "cpu", max_num_seqs=4)
    seq_lens, prompts = [13, 21], [13, 21]
    ks = {lay: [torch.randn(n + 1, HKV, D, generator=g) for n in seq_lens] for lay in (0, 1)}
    vs = {lay: [torch.randn(n + 1, HKV, D, generator=g) for n in seq_lens] for lay in (0, 1)}
    # prefill: every prompt token of both sequences
    meta = _meta(prompts, seq_lens)
    q = torch.randn(sum(prompts), HQ, D, generator=g)
    attn.begin_step(meta)
    for lay in (0, 1):
        k = torch.cat([x[:n] for x, n in zip(ks[lay], seq_lens, strict=True)])
        v = torch.cat([x[:n] for x, n in zip(vs[lay], seq_lens, strict=True)])
        got = attn(lay, q, k, v, meta)
        _check(cache, lay, got, q, ks[lay], vs[lay], seq_lens, prompts, meta)
    # decode: one more token each
    lens = [n + 1 for n in seq_lens]
    meta = _meta([1, 1], lens)
    q = torch.randn(2, HQ, D, generator=g)
    attn.begin_step(meta)
    for lay in (0, 1):
        k = torch.stack([x[n - 1] for x, n in zip(ks[lay], lens, strict=True)])
        v = torch.stack([x[n - 1] for x, n in zip(vs[lay], lens, strict=True)])
        got = attn(lay, q, k, v, meta)
        _check(cache, lay, got, q, ks[lay], vs[lay], lens, [1, 1], meta)


def _check(cache, lay, got, q, ks, vs, seq_lens, query_lens, meta):
    """Against the dequantized cache (tight) and the unquantized K/V (the FP8 error)."""
    table = meta.block_tables.long()
    deq_k, deq_v = [], []
    for i, n in enumerate(seq_lens):
        rows = cache.tensors[lay][table[i]]  # [MB, 2, bs, Hkv, D] in FP8
        flat = rows.double().reshape(-1, 2, BS, HKV, D)
        deq_k.append(flat[:, 0].reshape(-1, HKV, D)[:n] * cache.k_scales[lay])
        deq_v.append(flat[:, 1].reshape(-1, HKV, D)[:n] * cache.v_scales[lay])
        # what was stored is the FP8 rounding of x / scale, saturated
        fmax = torch.finfo(cache.spec.storage_dtype).max
        want = (ks[i][:n] / cache.k_scales[lay]).clamp(-fmax, fmax).to(cache.spec.storage_dtype)
        assert torch.equal(flat[:, 0].reshape(-1, HKV, D)[:n], want.double())
    exact = _reference(q, deq_k, deq_v, seq_lens, query_lens)
    torch.testing.assert_close(got.double(), exact, atol=2e-5, rtol=2e-5)
    ideal = _reference(q, ks, vs, seq_lens, query_lens)
    err = (got.double() - ideal).abs()
    # FP8 rounding: 2**-4 (e4m3) / 2**-3 (e5m2) relative per value; unit-variance inputs
    bound = 0.25 if cache.spec.kv_dtype == "fp8_e4m3" else 0.5
    assert err.max() < bound and err.mean() < bound / 5, (err.max(), err.mean())


def test_block_copies_move_fp8_bytes():
    spec = KVCacheSpec(1, HKV, D, BS, torch.bfloat16, "fp8_e4m3")
    cache = KVCache(spec, num_blocks=4)
    cache.tensors[0][1] = torch.randn(2, BS, HKV, D).to(torch.float8_e4m3fn)
    cache.copy_blocks([(1, 3)])
    assert torch.equal(cache.tensors[0][3].view(torch.uint8), cache.tensors[0][1].view(torch.uint8))
    assert spec.bytes_per_block * 2 == KVCacheSpec(1, HKV, D, BS, torch.bfloat16).bytes_per_block


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -1.0, float("inf"), 1e-39, "1", True])
def test_bad_scales_name_the_layer(bad):
    cache = KVCache(KVCacheSpec(2, HKV, D, BS, torch.float32, "fp8_e4m3"), num_blocks=4)
    with pytest.raises(ValidationError) as ei:
        cache.set_scales([1.0, 1.0], [1.0, bad])
    assert ei.value.param == "model.layers.1.self_attn.v_scale"
    assert cache.v_scales == [1.0, 1.0]
    with pytest.raises(ValidationError, match="one per layer"):
        cache.set_scales([1.0], [1.0, 1.0])


@pytest.mark.parametrize("bad", ["fp8", "float8_e4m3fn", None, 8])
def test_unknown_kv_dtype(bad):
    with pytest.raises(ValidationError) as ei:
        KVCacheSpec(1, HKV, D, BS, torch.float32, bad)
    assert ei.value.param == "kv_cache_dtype"


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
def test_chained_block_copies_run_in_order(kv_dtype):
    """(1 -> 2) then (2 -> 3) in one call: block 3 gets block 1's contents, not block 2's old
    ones (a fork of a fork in one step)."""
    cache = KVCache(KVCacheSpec(2, HKV, D, BS, torch.float32, kv_dtype), num_blocks=5)
    for t in cache.tensors:
        for b in range(5):
            t[b] = torch.full((2, BS, HKV, D), float(b)).to(t.dtype)
    cache.copy_blocks([(1, 2), (2, 3)])
    for t in cache.tensors:
        assert [float(t[b].float().mean()) for b in range(5)] == [0.0, 1.0, 1.0, 1.0, 4.0]
