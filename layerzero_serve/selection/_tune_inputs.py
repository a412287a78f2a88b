"""Synthetic inputs for timing kernels (see ``_tuning``): one paged-attention step or one
sampling batch per plan, shaped by its ``KernelContext``, and the call to time on a built kernel.

Decode: ``batch_bucket`` rows of one query token over ``context_len`` cached tokens. Prefill:
``min(batch_bucket, 4)`` prompts of ``prefill_len`` tokens. KV write: one token per row.
Sampling: ``softmax(randn * 3 / 0.8)`` rows with top-k 200 everywhere and top-p 0.95 on every
other row (a temperature + top-k mix). Fixed seeds: every candidate sees the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, Op

SAMPLING_TOP_K = 200
PREFILL_SEQS = 4


@dataclass(slots=True)
class _Paged:
    """One synthetic paged-attention step: ``n`` sequences of ``q_len`` new tokens each and
    ``seq_len`` tokens in the cache after the step."""

    q: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor
    meta: AttentionMetadata


def _paged(ctx: KernelContext, device: torch.device, n: int, q_len: int, seq_len: int) -> _Paged:
    g = torch.Generator(device=device).manual_seed(0)
    bs, hkv, d = ctx.block_size, ctx.num_kv_heads, ctx.head_dim
    dtype = getattr(torch, ctx.dtype)
    width = -(-seq_len // bs)
    table = (np.arange(n * width, dtype=np.int32) + 1).reshape(n, width)  # block 0: the null one
    meta = AttentionMetadata.from_host([q_len] * n, [seq_len] * n, table, bs, device)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    t = n * q_len
    return _Paged(
        randn(t, ctx.num_q_heads, d),
        randn(t, hkv, d),
        randn(t, hkv, d),
        randn(n * width + 1, 2, bs, hkv, d),
        meta,
    )


def _sampling_inputs(ctx: KernelContext, device: torch.device) -> tuple[torch.Tensor, ...]:
    b, v = ctx.batch_bucket, ctx.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(b, v, generator=g, device=device) * 3
    top_p = torch.ones(b, device=device)
    top_p[1::2] = 0.95
    return (
        torch.softmax(logits / 0.8, dim=-1),
        torch.full((b,), min(SAMPLING_TOP_K, v), dtype=torch.int32, device=device),
        top_p,
        torch.zeros(b, device=device),
        torch.arange(b, dtype=torch.int64, device=device),
        torch.zeros(b, dtype=torch.int64, device=device),
    )


def build_inputs(
    ctx: KernelContext, device: torch.device, context_len: int | None, prefill_len: int
) -> object:
    """The plan's synthetic inputs (built once, shared by its candidates): ``context_len``
    cached tokens per decode row (None: 1024 on a GPU, 256 on the CPU), ``prefill_len``
    prompt tokens per prefill sequence."""
    if ctx.op is Op.SAMPLING:
        return _sampling_inputs(ctx, device)
    if ctx.op is Op.ATTN_PREFILL:
        n = min(ctx.batch_bucket, PREFILL_SEQS)
        return _paged(ctx, device, n, prefill_len, prefill_len)
    ctx_len = context_len or (1024 if device.type == "cuda" else 256)
    return _paged(ctx, device, ctx.batch_bucket, 1, ctx_len if ctx.op is Op.ATTN_DECODE else 1)


def bind_call(op: Op, impl, x) -> Callable[[], object]:
    """The call to time on ``impl``; host planning (per step, not per layer) happens here."""
    if op is Op.SAMPLING:
        return lambda: impl.sample(*x)
    impl.plan(x.meta)
    if op is Op.KV_WRITE:
        return lambda: impl.write(x.key, x.value, x.kv_cache, x.meta)
    if op is Op.ATTN_PREFILL:  # the prompt's own K/V must be in the cache before attending
        impl.write_kv(x.key, x.value, x.kv_cache, x.meta)
    return lambda: impl.run(x.q, x.kv_cache, x.meta)
