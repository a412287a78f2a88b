"""The Triton KV write against the torch reference: exact slots, padding rows write nothing.
Runs under the Triton interpreter on the CPU (set before triton is imported) and on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from layerzero_serve.kernels import torch_ref  # noqa: E402
from layerzero_serve.kernels._triton.kv_write import triton_write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# The CPU interpreter has no bfloat16 stores (numpy has no bf16): bf16 is checked on the GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bs,hkv,d", [(1, 2, 16), (16, 2, 64), (16, 8, 128), (4, 1, 32)])
def test_matches_reference_and_skips_padding(dtype, bs, hkv, d):
    g = torch.Generator().manual_seed(bs * 1000 + hkv * 10 + d)
    num_blocks, t = 16, 11
    cache = torch.randn(num_blocks, 2, bs, hkv, d, generator=g).to(dtype).to(DEVICE)
    slots = torch.randperm((num_blocks - 1) * bs, generator=g)[:t] + bs  # never the null block
    slots[[2, 7]] = -1  # padding rows
    slots = slots.to(torch.int32).to(DEVICE)
    k = torch.randn(t, hkv, d, generator=g).to(DEVICE)  # float32: cast on write
    v = torch.randn(t, hkv, d, generator=g).to(DEVICE)
    ref = cache.clone()
    torch_ref.write_kv(k, v, ref, slots)
    triton_write_kv(k, v, cache, slots)
    assert torch.equal(cache, ref)


def test_strided_value_view_and_empty_batch():
    cache = torch.zeros(4, 2, 4, 2, 8, device=DEVICE)
    qkv = torch.randn(3, 3 * 16, device=DEVICE)
    k = qkv[:, 16:32].view(3, 2, 8)  # views into a fused projection, as the model makes them
    v = qkv[:, 32:].view(3, 2, 8)
    slots = torch.tensor([4, 9, -1], dtype=torch.int32, device=DEVICE)
    ref = cache.clone()
    torch_ref.write_kv(k, v, ref, slots)
    triton_write_kv(k, v, cache, slots)
    assert torch.equal(cache, ref)
    triton_write_kv(k[:0], v[:0], cache, slots[:0])
    assert torch.equal(cache, ref)
