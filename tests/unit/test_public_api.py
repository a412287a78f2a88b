"""The public API is listed in one place (``layerzero_serve.__all__``), every name resolves,
carries a docstring and is documented in docs/api.md; the embedding helpers behave:
``AttentionMetadata.from_host`` (slots, validation), ``build_attention`` (kernels chosen once,
attention equal to a dense float64 reference) and the forgotten-``begin_step`` guard."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import layerzero_serve as lz
from layerzero_serve.kernels import torch_ref

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


@pytest.fixture(autouse=True)
def _default_selection():
    """A fresh process-wide selector and policy (other tests lock or register kernels)."""
    from layerzero_serve.selection import configure, reload_policy, set_selector

    set_selector(None)
    configure(reset=True)
    reload_policy()
    yield
    set_selector(None)
    configure(reset=True)


def test_every_public_name_resolves_has_a_docstring_and_is_documented():
    text = DOCS.read_text()
    for name in lz.__all__:
        obj = getattr(lz, name)
        if name == "__version__":
            continue
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        assert f"`{name}" in text, f"{name} is not in docs/api.md"
    with pytest.raises(AttributeError):
        _ = lz.not_a_public_name


def test_every_public_docstring_says_what_cuda_graphs_may_capture():
    """The API convention: each public class and function states, in a "CUDA graphs:" line of
    its docstring, whether (and which part of) it is safe inside a CUDA graph."""
    missing = [
        name
        for name in lz.__all__
        if name != "__version__"
        and not re.search(
            r"^\s*CUDA graphs: \S", inspect.unwrap(getattr(lz, name)).__doc__ or "", re.M
        )
    ]
    assert missing == []


def test_metadata_from_host_slots_follow_the_block_table():
    table = np.array([[5, 2, 0], [7, 0, 0]], dtype=np.int32)
    meta = lz.AttentionMetadata.from_host([3, 1], [6, 2], table, 4)
    # sequence 0 writes positions 3, 4, 5 -> blocks 5, 2, 2; sequence 1 position 1 -> block 7
    assert meta.slot_mapping.tolist() == [5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 7 * 4 + 1]
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.seq_lens_cpu == [6, 2] and meta.max_query_len == 3 and meta.num_tokens == 4
    padded = lz.AttentionMetadata.from_host([1, 1], [6, 1], table, 4, slot_mapping=[21, -1])
    assert padded.slot_mapping.tolist() == [21, -1]
    with pytest.raises(ValueError, match="query_lens"):
        lz.AttentionMetadata.from_host([3, 0], [6, 2], table, 4)
    with pytest.raises(ValueError, match="block_tables"):
        lz.AttentionMetadata.from_host([1], [20], table[:1], 4)
    with pytest.raises(ValueError, match="slot_mapping"):
        lz.AttentionMetadata.from_host([2, 1], [6, 2], table, 4, slot_mapping=[1])


def test_build_attention_matches_dense_attention_and_guards_begin_step():
    torch.manual_seed(0)
    hq, hkv, d, bs = 4, 2, 16, 4
    kv = lz.KVCache(lz.KVCacheSpec(1, hkv, d, bs, torch.float32), num_blocks=8, device="cpu")
    attn = lz.build_attention(kv, hq, "cpu", max_num_seqs=4)
    for bad in (0, 3, 2.0):
        with pytest.raises(ValueError, match="num_q_heads"):
            lz.build_attention(kv, bad, "cpu")
    assert "kv_write=" in attn.name
    lens = [6, 3]
    table = np.array([[1, 2], [3, 0]], dtype=np.int32)
    meta = lz.AttentionMetadata.from_host(lens, lens, table, bs)  # two prefills
    t = sum(lens)
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    with pytest.raises(RuntimeError, match="begin_step"):
        attn(0, q, k, v, meta)
    attn.begin_step(meta)
    out = attn(0, q, k, v, meta)
    at = 0
    for n in lens:  # independent float64 reference per sequence
        s = slice(at, at + n)
        ref = torch_ref.dense_causal_attention(q[s].double(), k[s].double(), v[s].double())
        torch.testing.assert_close(out[s].double(), ref, atol=1e-5, rtol=1e-5)
        at += n
