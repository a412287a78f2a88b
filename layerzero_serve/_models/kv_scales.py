"""FP8 KV-cache scales from a checkpoint: one float per layer for K and one for V, stored as
scalar tensors ``model.layers.{i}.self_attn.k_scale`` and ``.v_scale`` (the layout that
quantization tools such as llm-compressor write next to the weights).

The engine uses them with ``kv_cache_dtype="fp8_e4m3" | "fp8_e5m2"``; a checkpoint without
them gets the documented default, 1.0 (stored value = K or V itself). Host only (start-up).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from layerzero_serve._models.loader import checkpoint_files
from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import check_kv_scale

DEFAULT_KV_SCALE = 1.0


def _name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.self_attn.{kind}_scale"


def read_kv_scales(path: Path | None, num_layers: int) -> tuple[list[float], list[float]] | None:
    """``(k_scales, v_scales)`` from the safetensors files of checkpoint directory ``path``
    (the files the loader reads: ``loader.checkpoint_files``), or None when it has none (or
    ``path`` is not a safetensors checkpoint).

    Raises ValidationError naming the tensor when a scale is not one finite value > 0 (NaN,
    zero, negative, several values), or when only some layers have scales."""
    if path is None or not Path(path).is_dir():
        return None
    found: dict[str, float] = {}
    wanted = {_name(i, kind) for i in range(num_layers) for kind in ("k", "v")}
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in wanted.intersection(f.keys()):
                found[key] = _scalar(key, f.get_tensor(key))
    if not found:
        return None
    absent = sorted(wanted - found.keys())
    if absent:
        raise ValidationError(
            absent[0], "absent", f"present for every layer, as {len(found)} other scales are"
        )
    k = [found[_name(i, "k")] for i in range(num_layers)]
    v = [found[_name(i, "v")] for i in range(num_layers)]
    return k, v


def _scalar(key: str, t: torch.Tensor) -> float:
    if t.numel() != 1 or not t.dtype.is_floating_point:
        raise ValidationError(key, f"{t.dtype} {tuple(t.shape)}", "one floating-point value")
    return check_kv_scale(key, float(t.double().item()))
