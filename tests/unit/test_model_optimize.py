"""The GPU fast path's model changes (fused q/k/v and gate/up GEMMs, pluggable norm and
activation kernels) keep the model's function: same logits within fp32 rounding, same params."""

from __future__ import annotations

import torch

from layerzero_serve._models import build_dummy_model
from layerzero_serve._models.layers import apply_rope
from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.metadata import AttentionMetadata


def _dense_attn(layer, q, k, v, meta: AttentionMetadata):
    return torch_ref.dense_causal_attention(q, k, v)


def _forward(model, ids):
    t = len(ids)
    meta = AttentionMetadata(
        1,
        t,
        16,
        torch.tensor([0, t]),
        torch.tensor([t]),
        torch.zeros(1, 1, dtype=torch.int32),
        torch.full((t,), -1),
        t,
        t,
        [0, t],
        [t],
    )
    with torch.no_grad():
        h = model(torch.tensor(ids), torch.arange(t), _dense_attn, meta)
        return model.compute_logits(h)


def test_fused_projections_and_plugged_kernels_match():
    model = build_dummy_model("dummy:tiny", torch.float32, "cpu", seed=3)
    ids = [5, 17, 200, 3, 99, 42, 7]
    ref = _forward(model, ids)
    n_params = sum(p.numel() for p in model.parameters())
    calls = {"norm": 0, "act": 0}

    def norm(x, w, eps):
        calls["norm"] += 1
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def act(g, u):
        calls["act"] += 1
        return torch.nn.functional.silu(g) * u

    def rope(q, k, cos, sin):
        calls["rope"] += 1
        return apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])

    calls["rope"] = 0
    model.optimize(fuse=True, rmsnorm=norm, swiglu=act, rope=rope)
    out = _forward(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == n_params  # views, no new memory
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.data_ptr() == layer.self_attn.qkv[0].data_ptr()
    assert calls == {"norm": 2 * 2 + 1, "act": 2, "rope": 2}


class _TorchAddNorm:
    """A plain-torch RMSNorm offering ``add_rmsnorm``: the model's fused-residual path."""

    def __init__(self):
        self.adds = 0

    def __call__(self, x, w, eps):
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def add_rmsnorm(self, x, residual, w, eps):
        self.adds += 1
        residual.add_(x)
        return self(residual, w, eps), residual


def test_fused_residual_add_norm_path_is_the_same_computation():
    """With an RMSNorm kernel that offers add_rmsnorm, every residual add is fused into the next
    norm; torch ops in both paths, so the logits are bitwise the reference's."""
    model = build_dummy_model("dummy:tiny", torch.float32, "cpu", seed=4)
    ids = [9, 1, 250, 33, 8]
    ref = _forward(model, ids)
    norm = _TorchAddNorm()
    model.optimize(fuse=False, rmsnorm=norm)
    assert torch.equal(_forward(model, ids), ref)
    assert norm.adds == 2 * len(model.model.layers)
