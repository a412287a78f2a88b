"""Plans: one KernelContext per (op, phase, batch bucket, q length, graph mode) a runner needs.

The runner asks the selector once per plan at start-up (and once per captured bucket); per-step
and per-layer code only reads the decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerzero_serve.kernels.spec import KV_READ_OPS, KernelContext, Op
from layerzero_serve.selection._device import DeviceInfo
from layerzero_serve.selection._selector import KernelChoice, Selector, get_selector


def batch_buckets(max_batch: int, step: int = 8) -> list[int]:
    """1, 2, 4, 8, then every ``step`` up to ``max_batch`` (which is always included)."""
    if max_batch < 1:
        from layerzero_serve.errors import ValidationError

        raise ValidationError("max_batch", max_batch, ">= 1")
    out = [b for b in (1, 2, 4, 8) if b <= max_batch]
    out += list(range(16, max_batch + 1, step))
    if out[-1] != max_batch:
        out.append(max_batch)
    return out


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the plans need to know about a model (``kv_dtype``: how its KV cache is stored,
    one of ``kernels.spec.KV_DTYPES``; it reaches the plans of the ops that read the cache)."""

    dtype: str
    head_dim: int
    num_q_heads: int
    num_kv_heads: int
    vocab_size: int
    kv_dtype: str = "auto"


def base_context(
    op: Op,
    *,
    device: DeviceInfo,
    shape: ModelShape,
    block_size: int,
    batch_bucket: int,
    q_len: int,
    graph_mode: bool,
) -> KernelContext:
    """The plan of ``op`` on ``device`` for a model of ``shape``: ``block_size`` tokens per KV
    block, ``batch_bucket`` rows (a captured bucket, else the maximum batch), ``q_len`` query
    tokens per row (0: variable, as in prefill), ``graph_mode`` whether it runs in a CUDA graph.
    Keyword-only after ``op``: the call names every number."""
    return KernelContext(
        op=op,
        device_type=device.type,
        sm=device.sm,
        generation=device.generation,
        dtype=shape.dtype,
        head_dim=shape.head_dim,
        num_q_heads=shape.num_q_heads,
        num_kv_heads=shape.num_kv_heads,
        block_size=block_size,
        batch_bucket=batch_bucket,
        q_len=q_len,
        graph_mode=graph_mode,
        vocab_size=shape.vocab_size,
        kv_dtype=shape.kv_dtype if op in KV_READ_OPS else "auto",
    )


def model_plans(
    device: DeviceInfo,
    shape: ModelShape,
    block_size: int,
    max_num_seqs: int,
    decode_buckets: list[int] | None = None,
) -> list[KernelContext]:
    """Every plan of a serving run: prefill and KV write (eager, variable length), decode per
    bucket (graph mode when buckets are given, else one eager plan at ``max_num_seqs``),
    sampling, and the per-layer norm/rope/activation ops."""
    graph = decode_buckets is not None

    def ctx(op: Op, batch_bucket: int, q_len: int, graph_mode: bool) -> KernelContext:
        return base_context(
            op,
            device=device,
            shape=shape,
            block_size=block_size,
            batch_bucket=batch_bucket,
            q_len=q_len,
            graph_mode=graph_mode,
        )

    plans = [ctx(Op.ATTN_PREFILL, max_num_seqs, 0, False), ctx(Op.KV_WRITE, max_num_seqs, 0, graph)]
    for b in decode_buckets or [max_num_seqs]:
        plans.append(ctx(Op.ATTN_DECODE, b, 1, graph))
    plans.append(ctx(Op.SAMPLING, max_num_seqs, 1, False))
    plans += [ctx(op, max_num_seqs, 0, graph) for op in (Op.RMSNORM, Op.ROPE, Op.SWIGLU)]
    return plans


def select_plans(
    plans: list[KernelContext],
    selector: Selector | None = None,
) -> dict[KernelContext, KernelChoice]:
    """Ask once per plan."""
    sel = selector or get_selector()
    return {p: sel.select(p.op, p) for p in plans}
