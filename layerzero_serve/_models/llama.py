"""One decoder implementation for Llama 2/3/3.1/3.2, Mistral, Qwen2 and Qwen3.

The model is stateless with respect to the KV cache: every attention layer computes q, k, v for
the packed batch (bias, Qwen3 qk-norm, RoPE at the given positions) and hands them to the
runtime's ``attn`` callable together with the step's :class:`AttentionMetadata`; that callable
writes K/V into the paged cache and attends. Everything else is per token, so sequences can be
packed back to back in one ``[T]`` token vector.

Module and parameter names mirror the Hugging Face checkpoints (``model.layers.{i}.self_attn
.q_proj.weight`` ...) so weights load 1:1; q/k/v and gate/up are deliberately not fused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from layerzero_serve._models.config import ModelConfig
from layerzero_serve._models.layers import (
    Embedding,
    GatedMLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
)

if TYPE_CHECKING:
    from layerzero_serve.distributed import TPGroup, TPLayout
    from layerzero_serve.kernels.metadata import AttentionMetadata

#: ``attn(layer_idx, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], meta) -> [T, Hq, D]``.
#: Supplied by the runtime; scale is ``head_dim ** -0.5``, causal within each sequence.
AttentionFn = Callable[
    [int, torch.Tensor, torch.Tensor, torch.Tensor, "AttentionMetadata"], torch.Tensor
]

Device = torch.device | str


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        device: Device,
        layout: TPLayout | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        src = cfg if layout is None else layout  # this rank's heads under tensor parallelism
        self.num_heads, self.num_kv_heads, self.head_dim = (
            src.num_heads,
            src.num_kv_heads,
            cfg.head_dim,
        )
        h, q, kv = cfg.hidden_size, self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        kw = {"dtype": dtype, "device": device}
        self.q_proj = Linear(h, q, bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(h, kv, bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(h, kv, bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(q, h, bias=cfg.o_proj_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # after fuse()
        self.rope_impl = None  # optional fused ``rope(q, k, cos [T, D], sin [T, D]) -> (q, k)``
        self.tp: TPGroup | None = None  # row-parallel o_proj: all-reduce its output

    def fuse(self) -> None:
        """One GEMM for q, k and v (weights concatenated; the separate parameters become views
        of the fused tensor, so no memory is added)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        w = torch.cat([p.weight.data for p in projs])
        b = torch.cat([p.bias.data for p in projs]) if self.q_proj.bias is not None else None
        start = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight.data = w[start : start + n]
            if b is not None:
                p.bias.data = b[start : start + n]
            start += n
        self.qkv = (w, b)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionFn,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = nn.functional.linear(x, *self.qkv).split([nq, nkv, nkv], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_impl is None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            q, k = self.rope_impl(q, k, cos[:, 0], sin[:, 0])
        out = attn(self.layer_idx, q, k, v, meta)
        out = self.o_proj(out.reshape(t, self.num_heads * self.head_dim))
        return out if self.tp is None else self.tp.all_reduce_(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        dtype: torch.dtype,
        device: Device,
        layout: TPLayout | None = None,
    ):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, dtype, device, layout)
        inter = cfg.intermediate_size if layout is None else layout.intermediate_size
        self.mlp = GatedMLP(cfg.hidden_size, inter, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionFn,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: Device, layout: TPLayout | None
    ):
        super().__init__()
        vocab = cfg.vocab_size if layout is None else layout.local_vocab
        self.embed_tokens = Embedding(vocab, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, dtype, device, layout) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.rotary_emb = RotaryEmbedding(cfg, device)


class LlamaForCausalLM(nn.Module):
    """Decoder-only causal LM for every supported architecture.

    ``LlamaForCausalLM(config, dtype, device)`` builds the module with PyTorch's default random
    init (use :func:`~layerzero_serve._models.load_model` for a checkpoint or
    :func:`~layerzero_serve._models.build_dummy_model` for seeded random weights); with
    ``device="meta"`` nothing is allocated (the loaders use that, then assign tensors and call
    :meth:`finalize`). Parameters never require grad.
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: Device = "cpu",
        layout: TPLayout | None = None,
    ):
        super().__init__()
        self.config = config
        self.dtype = dtype
        # tensor parallelism: this rank's share (``distributed.TPLayout``) and, once the
        # process group exists, the collectives (``set_tp``); None = the whole model here
        self.layout = layout
        self.tp: TPGroup | None = None
        self.model = LlamaModel(config, dtype, device, layout)
        vocab = config.vocab_size if layout is None else layout.local_vocab
        self.lm_head = Linear(config.hidden_size, vocab, bias=False, dtype=dtype, device=device)
        self.tie_weights()
        self.requires_grad_(False)
        # ``add_rmsnorm(x, residual, weight, eps) -> (normed, residual)`` (residual updated in
        # place), installed by ``optimize`` when the RMSNorm kernel offers it.
        self._add_rmsnorm = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def set_tp(self, tp: TPGroup | None) -> None:
        """Install the tensor-parallel collectives: one all-reduce after each row-parallel
        projection (o_proj, down_proj) and after the vocabulary-parallel embedding, one
        all-gather of the logits. ``None`` (one rank) calls no collective."""
        if tp is not None and self.layout is None:
            raise ValueError("set_tp needs a model built with a TPLayout")
        self.tp = tp
        for layer in self.model.layers:
            layer.self_attn.tp = tp
            layer.mlp.reduce = None if tp is None else tp.all_reduce_

    def optimize(self, fuse: bool = True, rmsnorm=None, swiglu=None, rope=None) -> None:
        """GPU fast path: fuse q/k/v and gate/up GEMMs, and install fused kernels chosen by the
        selection engine (``rmsnorm(x, weight, eps)``, ``swiglu(gate, up)``,
        ``rope(q, k, cos, sin)``). Numerics stay
        within the dtype's rounding of the reference but are not bitwise HF's."""
        for layer in self.model.layers:
            if fuse and layer.self_attn.qkv is None:
                layer.self_attn.fuse()
                layer.mlp.fuse()
            layer.mlp.act = swiglu
            layer.self_attn.rope_impl = rope
            for norm in (
                layer.input_layernorm,
                layer.post_attention_layernorm,
                layer.self_attn.q_norm,
                layer.self_attn.k_norm,
            ):
                if norm is not None:
                    norm.impl = rmsnorm
        self.model.norm.impl = rmsnorm
        self._add_rmsnorm = getattr(rmsnorm, "add_rmsnorm", None)

    def tie_weights(self) -> None:
        """Share ``lm_head.weight`` with ``model.embed_tokens.weight`` when the config ties."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def finalize(self, device: Device) -> list[str]:
        """After tensors were assigned in place of meta ones: re-tie, build the RoPE buffer on
        ``device``; returns the names of parameters still on ``meta`` (not provided)."""
        self.tie_weights()
        self.model.rotary_emb.reset_buffers(device)
        return [n for n, p in self.named_parameters() if p.is_meta]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionFn,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Packed ``input_ids [T]`` at ``positions [T]`` -> final-normed hidden ``[T, hidden]``
        in the model dtype."""
        h = self._embed(input_ids)
        cos, sin = self.model.rotary_emb(positions, h.dtype)
        if self._add_rmsnorm is not None:
            return self._forward_fused_norms(h, cos, sin, attn, meta)
        for layer in self.model.layers:
            h = layer(h, cos, sin, attn, meta)
        return self.model.norm(h)

    def _forward_fused_norms(self, h, cos, sin, attn, meta) -> torch.Tensor:
        """The same computation with each residual add fused into the next RMSNorm: the
        residual stream ``res`` is updated in place, ``x`` is the normed input of the next
        block (the reference's ``h + block(norm(h))`` rounds identically)."""
        add_norm = self._add_rmsnorm
        layers = self.model.layers
        res = h  # a fresh tensor from the embedding lookup: updated in place below
        first = layers[0].input_layernorm
        x = first(res)
        for i, layer in enumerate(layers):
            a = layer.self_attn(x, cos, sin, attn, meta)
            post = layer.post_attention_layernorm
            x, res = add_norm(a, res, post.weight, post.eps)
            m = layer.mlp(x)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            x, res = add_norm(m, res, nxt.weight, nxt.eps)
        return x

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[T, hidden]``; vocabulary-parallel under tensor parallelism (each
        rank looks up the ids in its range, zeros elsewhere, one all-reduce: an exact sum)."""
        if self.tp is None:
            return self.model.embed_tokens(input_ids)
        lay = self.layout
        local = input_ids - lay.vocab_start
        outside = (local < 0) | (local >= lay.local_vocab)
        h = self.model.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce_(h.masked_fill(outside[:, None], 0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [S, hidden]`` (typically the last token of each sequence) -> float32
        ``[S, vocab]``. Under tensor parallelism every rank calls it with the same ``hidden``
        (the residual stream is replicated) and gets the gathered logits."""
        logits = self.lm_head(hidden)
        if self.tp is not None:
            logits = self.tp.all_gather_columns(logits)[:, : self.config.vocab_size]
        return logits.float()


def set_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the parameter ``name`` (dotted) by ``tensor`` without copying it."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
