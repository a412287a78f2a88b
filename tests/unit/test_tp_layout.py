"""Tensor-parallel layout: every rank's query heads read exactly the KV head it holds (the GQA
map of the unsharded model), the pieces of every column-/row-parallel tensor tile the whole
tensor, vocabulary pieces are zero-padded, and a row-parallel bias is added once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from layerzero_serve.distributed import TPLayout, check_tensor_parallel, shard


def _cfg(hq, hkv, inter=96, vocab=101):
    return SimpleNamespace(num_heads=hq, num_kv_heads=hkv, intermediate_size=inter,
                           vocab_size=vocab)  # fmt: skip


@pytest.mark.parametrize(("hq", "hkv", "n"), [(4, 2, 2), (8, 2, 4), (6, 1, 3), (8, 2, 8),
                                              (12, 4, 2), (4, 4, 4)])  # fmt: skip
def test_query_heads_read_the_kv_head_they_hold(hq, hkv, n):
    mc = _cfg(hq, hkv)
    check_tensor_parallel(n, mc)
    group = hq // hkv  # query heads per KV head in the unsharded model
    for r in range(n):
        lay = TPLayout.of(mc, r, n)
        q_heads = range(r * lay.num_heads, (r + 1) * lay.num_heads)
        local_group = lay.num_heads // lay.num_kv_heads
        for j, h in enumerate(q_heads):
            assert lay.kv_head_start + j // local_group == h // group


def test_column_and_row_pieces_tile_the_tensor():
    mc, d = _cfg(6, 2), 4
    n = 2
    full_q = torch.randn(6 * d, 16)
    full_o = torch.randn(16, 6 * d)
    full_up = torch.randn(96, 16)
    lays = [TPLayout.of(mc, r, n) for r in range(n)]
    q = [shard("model.layers.0.self_attn.q_proj.weight", full_q, lay, d, full_q.shape)
         for lay in lays]  # fmt: skip
    o = [shard("model.layers.0.self_attn.o_proj.weight", full_o, lay, d, full_o.shape)
         for lay in lays]  # fmt: skip
    up = [shard("model.layers.3.mlp.up_proj.weight", full_up, lay, d, full_up.shape)
          for lay in lays]  # fmt: skip
    assert torch.equal(torch.cat(q), full_q)
    assert torch.equal(torch.cat(o, dim=1), full_o)
    assert torch.equal(torch.cat(up), full_up)
    x = torch.randn(3, 6 * d, dtype=torch.float64)
    partial = sum(x[:, r * 12 : (r + 1) * 12] @ o[r].double().T for r in range(n))
    torch.testing.assert_close(partial, x @ full_o.double().T)


def test_vocabulary_pieces_are_zero_padded():
    mc = _cfg(4, 2, vocab=101)
    emb = torch.randn(101, 8)
    pieces = [shard("model.embed_tokens.weight", emb, TPLayout.of(mc, r, 3), 4, emb.shape)
              for r in range(3)]  # fmt: skip
    assert [p.shape[0] for p in pieces] == [34, 34, 34]
    whole = torch.cat(pieces)
    assert torch.equal(whole[:101], emb) and not whole[101:].any()


def test_row_parallel_bias_is_held_by_rank_zero_only():
    mc = _cfg(4, 2)
    bias = torch.randn(16)
    got = [shard("model.layers.1.self_attn.o_proj.bias", bias, TPLayout.of(mc, r, 2), 4, (16,))
           for r in range(2)]  # fmt: skip
    assert torch.equal(got[0], bias) and not got[1].any()


def test_norms_are_replicated():
    w = torch.randn(16)
    lay = TPLayout.of(_cfg(4, 2), 1, 2)
    assert torch.equal(shard("model.layers.0.input_layernorm.weight", w, lay, 4, (16,)), w)
