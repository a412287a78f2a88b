"""Building blocks shared by the decoder models: RMSNorm, rotary embedding, SiLU-gated MLP.

Numerics follow the Hugging Face reference: RMSNorm normalises in float32 and casts back before
the weight multiply; RoPE angles, cos and sin are computed in float32 and cast to the activation
dtype before they are applied.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from layerzero_serve._models.config import ModelConfig


class Linear(nn.Linear):
    """``nn.Linear`` that skips its random init on the ``meta`` device: meta-tensor init goes
    through ``torch._refs`` and imports ``torch._dynamo`` (seconds) for nothing."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Embedding(nn.Embedding):
    """``nn.Embedding`` that skips its random init on the ``meta`` device (see ``Linear``)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim, normalised in float32."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps
        # Optional fused kernel ``impl(x, weight, eps)`` chosen by the selection engine.
        self.impl = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl is not None:
            return self.impl(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rope_inv_freq(config: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 ``[head_dim // 2]`` inverse frequencies, with llama3 scaling when configured."""
    dim = config.head_dim
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta**exps)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE. cos/sin are computed per call from the token positions, so
    no table sized by ``max_position_embeddings`` is kept and packed batches need no gather."""

    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig, device: torch.device | str):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.reset_buffers(device)

    def reset_buffers(self, device: torch.device | str) -> None:
        """(Re)compute ``inv_freq`` on ``device`` (after building the model on ``meta``)."""
        if torch.device(device).type == "meta":
            self.inv_freq = torch.empty(self.config.head_dim // 2, device="meta")
        else:
            self.inv_freq = rope_inv_freq(self.config, device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``positions [T]`` -> ``(cos, sin)``, each ``[T, 1, head_dim]`` in ``dtype``."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` rotated by ``cos/sin [T, 1, D]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = Linear(hidden, inter, **kw)
        self.up_proj = Linear(hidden, inter, **kw)
        self.down_proj = Linear(inter, hidden, **kw)
        self.gate_up: torch.Tensor | None = None  # [2 * inter, hidden] after fuse()
        self.act = None  # optional fused ``act(gate, up) -> silu(gate) * up``
        # tensor parallelism: the all-reduce after the row-parallel down_proj (None: one rank)
        self.reduce = None

    def fuse(self) -> None:
        """One GEMM for gate and up: concatenate the weights, and re-point the separate
        parameters at views of the fused tensor (no extra memory)."""
        g, u = self.gate_proj.weight, self.up_proj.weight
        self.gate_up = fused = torch.cat([g.data, u.data])
        g.data, u.data = fused[: g.shape[0]], fused[g.shape[0] :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = nn.functional.linear(x, self.gate_up).chunk(2, dim=-1)
        act = nn.functional.silu(gate) * up if self.act is None else self.act(gate, up)
        out = self.down_proj(act)
        return out if self.reduce is None else self.reduce(out)
