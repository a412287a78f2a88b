"""The CPU decode path of the torch backend (``kernels/sdpa_decode.py``) against the float64
reference: GQA and MHA, ragged lengths, padding rows, negative padding ids, and NaN garbage
past a sequence's end that must not leak."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.sdpa_decode import decode_gather, sdpa_paged_decode


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_float64_reference(hq, hkv, dtype):
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    n, bs, d, s, mb = 64, 16, 32, 6, 5
    kv = torch.randn(n, 2, bs, hkv, d, generator=g).to(dtype)
    q = torch.randn(s, hq, d, generator=g).to(dtype)
    # disjoint blocks per row, so NaN garbage past one row's end is in no other row's range
    table = (torch.randperm(n - 1, generator=g)[: s * mb] + 1).view(s, mb).to(torch.int32)
    lens = torch.tensor([80, 20, 1, 33, 0, 79], dtype=torch.int32)
    for i, length in enumerate(lens.tolist()):
        for j in range(length, mb * bs):
            kv[int(table[i, j // bs]), :, j % bs] = float("nan")
    table[1, 2:] = -1  # padding entries past a short sequence (read block 0)
    got = sdpa_paged_decode(q, kv, table, lens)
    ref = torch_ref.paged_decode(q.double(), kv.double(), table, lens, compute_dtype=torch.float64)
    assert got.dtype == dtype and got.shape == (s, hq, d)
    assert not got.isnan().any()
    assert torch.equal(got[4], torch.zeros_like(got[4]))  # seq_len 0: a padding row
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def test_a_gather_planned_once_per_step_gives_the_same_bits():
    """The torch adapter computes ``decode_gather`` once per step and every layer reuses it."""
    g = torch.Generator().manual_seed(5)
    n, bs, hkv, d = 32, 8, 2, 16
    table = torch.tensor([[3, 7, 1], [9, 0, 0], [4, 5, 6]], dtype=torch.int32)
    lens = torch.tensor([20, 8, 17], dtype=torch.int32)
    gather = decode_gather(table, lens, bs)
    for _ in range(3):  # three "layers"
        kv = torch.randn(n, 2, bs, hkv, d, generator=g)
        q = torch.randn(3, 4, d, generator=g)
        a = sdpa_paged_decode(q, kv, table, lens, gather=gather)
        b = sdpa_paged_decode(q, kv, table, lens)
        assert torch.equal(a, b)
