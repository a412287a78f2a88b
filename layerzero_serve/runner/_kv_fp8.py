"""FP8 KV cache at the attention dispatch: per-tensor scales folded around the kernels.

With per-layer scales ``s_k`` and ``s_v`` the cache stores ``K / s_k`` and ``V / s_v`` in FP8
(saturated to the format's range). Attention over the dequantized cache is then exactly
``softmax((q * s_k) . K_stored^T) V_stored * s_v``: the dispatch scales the query before the
kernel and the output after it, so a kernel that reads an FP8 cache only casts the stored
values to its compute dtype. Writers move the quantized bytes (``uint8`` views of the values
and of the cache): every writer handles them, whatever its FP8 support.

CUDA-graph safe: elementwise device work; the scales are host floats fixed at start-up (set
before capture, baked into the graphs).
"""

from __future__ import annotations

import torch

from layerzero_serve.kv_cache import KVCache


class FP8KVScaling:
    """The quantize / scale steps of one FP8 KV cache (``cache.spec.is_fp8``)."""

    __slots__ = ("_cache", "_dtype", "_max")

    def __init__(self, cache: KVCache) -> None:
        self._cache = cache
        self._dtype = cache.spec.storage_dtype
        self._max = torch.finfo(self._dtype).max

    def quantize(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``x [T, Hkv, D]`` -> its FP8 bytes (uint8 ``[T, Hkv, D]``): ``x / scale`` in float32,
        saturated to the format's largest finite value (NaN stays NaN), rounded to FP8."""
        y = x.to(torch.float32) * (1.0 / scale)
        return y.clamp_(-self._max, self._max).to(self._dtype).view(torch.uint8)

    def before(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query scaled by ``s_k``, K bytes, V bytes, the layer cache's byte view)."""
        cache = self._cache
        ks, vs = cache.k_scales[layer], cache.v_scales[layer]
        kq, vq = self.quantize(k, ks), self.quantize(v, vs)
        return q * ks, kq, vq, cache.byte_views[layer]

    def after(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The kernel's output times the layer's ``s_v``."""
        return out * self._cache.v_scales[layer]
