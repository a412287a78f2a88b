"""``cpu_write_kv`` (the CPU's eager K/V write) leaves the cache bit-identical to the
graph-safe reference ``torch_ref.write_kv``: padding slots (-1) write nothing, every other slot
of the cache keeps its bits (NaN included), dtype casts match, and caches that are not
contiguous or not on the CPU go to the reference."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.cpu_kv_write import cpu_write_kv


def _case(seed: int, dtype: torch.dtype, slots: list[int]):
    g = torch.Generator().manual_seed(seed)
    n, bs, hkv, d = 12, 4, 3, 8
    cache = torch.randn(n, 2, bs, hkv, d, generator=g).to(dtype)
    cache[5, 1, 2] = float("nan")  # untouched slots keep their bits, NaN included
    t = len(slots)
    key = torch.randn(t, hkv, d, generator=g)
    value = torch.randn(t, hkv, d, generator=g)
    return cache, key, value, torch.tensor(slots, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "slots",
    [[0, 5, 47, 13], [-1, 9, -1, 30, 2], [-1, -1], [7]],
    ids=["all-valid", "padding", "only-padding", "one"],
)
def test_bit_identical_to_the_reference(dtype, slots):
    cache, key, value, slot_mapping = _case(len(slots), dtype, slots)
    ref = cache.clone()
    torch_ref.write_kv(key, value, ref, slot_mapping)
    cpu_write_kv(key, value, cache, slot_mapping)
    bits = torch.int32 if dtype == torch.float32 else torch.int16  # compare bits: NaN == NaN
    assert torch.equal(cache.view(bits), ref.view(bits))
    for t, s in enumerate(slots):
        if s >= 0:  # the written values, cast to the cache's dtype
            assert torch.equal(cache[s // 4, 0, s % 4], key[t].to(dtype))
            assert torch.equal(cache[s // 4, 1, s % 4], value[t].to(dtype))


def test_a_cache_that_is_not_contiguous_goes_to_the_reference():
    cache, key, value, slot_mapping = _case(1, torch.float32, [3, -1, 17])
    wide = torch.zeros(12, 2, 4, 3, 16)
    view = wide[..., :8]  # a strided view: no flat row layout
    view.copy_(cache)
    ref = cache.clone()
    torch_ref.write_kv(key, value, ref, slot_mapping)
    cpu_write_kv(key, value, view, slot_mapping)
    assert torch.equal(view.nan_to_num(7.0), ref.nan_to_num(7.0))
    assert torch.equal(wide[..., 8:], torch.zeros(12, 2, 4, 3, 8))


def test_bad_shapes_raise_the_references_error():
    cache, key, value, slot_mapping = _case(2, torch.float32, [1, 2])
    with pytest.raises(ValueError, match="num_kv_heads|key/value"):
        cpu_write_kv(key[:, :2], value[:, :2], cache, slot_mapping)


def test_rows_planned_once_per_step_give_the_same_cache():
    """The adapters compute ``write_rows`` in ``plan`` and every layer reuses them."""
    from layerzero_serve.kernels.cpu_kv_write import write_rows

    for slots in ([0, 5, 47, 13], [-1, 9, -1, 30, 2]):
        a, key, value, slot_mapping = _case(3, torch.float32, slots)
        b = a.clone()
        cpu_write_kv(key, value, a, slot_mapping, write_rows(slot_mapping, 4))
        cpu_write_kv(key, value, b, slot_mapping)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
