"""Triton adapter: the project's own paged-attention kernels behind plan/write_kv/run.

* ``write_kv``: :func:`~layerzero_serve.kernels._triton.kv_write.triton_write_kv` (graph-safe).
* ``run``: decode-only batches (one token per sequence) go to the split-KV
  :func:`~layerzero_serve.kernels._triton.paged_decode.triton_paged_decode`, whose split count is
  chosen from the block table's width (a shape, so a captured graph and an eager call of the same
  padded batch launch identical kernels and agree bitwise); everything else (prefill, extend,
  chunked, mixed, verification) goes to
  :func:`~layerzero_serve.kernels._triton.paged_prefill.triton_paged_prefill`.
* ``plan`` does no host work: the kernels read lengths and tables on the device.

Importing this module does not import triton: the factories import the kernel modules lazily.
Constraints: CUDA, SM 80+ (bf16 ``tl.dot``), fp16/bf16/fp32, head_dim a power of two in
{32, 64, 128} (tile sizes are tuned for these), any page size, any GQA ratio.

Graph safety: decode and KV write never read device values on the host. Prefill launches a grid
sized by ``max_query_len`` (a per-step host value), so a captured prefill graph would only be
correct for batches within the captured bound: declared not graph-safe. Verification plans fix
the tokens per row (``ctx.q_len``), and the grid is sized from it: graph-safe.
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels.attention_api import SlotKVWrite
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op

__all__ = ["SPECS", "TritonPagedAttention"]


class TritonPagedAttention:
    """plan/write_kv/run over the Triton kernels (see ``kernels.attention_api``)."""

    # plan() reads only the batch shape: a captured bucket need not re-plan per step.
    host_plan_per_step = False

    def __init__(self, ctx: KernelContext | None = None) -> None:
        from layerzero_serve.kernels._triton.kv_write import triton_write_kv
        from layerzero_serve.kernels._triton.paged_decode import triton_paged_decode
        from layerzero_serve.kernels._triton.paged_prefill import triton_paged_prefill

        self.name = "triton.paged_attention"
        self.ctx = ctx
        self._write = triton_write_kv
        self._decode_fn = triton_paged_decode
        self._prefill_fn = triton_paged_prefill
        # Verification plans fix the tokens per row: size the prefill grid for it.
        self._min_query_len = ctx.q_len if ctx is not None and ctx.op == Op.ATTN_VERIFY else 0
        self._decode = False
        # ``num_seqs -> split count`` for decode, set by the runner so that an eager batch and
        # the captured bucket it would pad to split every sequence identically (greedy output
        # is then the same with graphs on and off). None: derived from the table width.
        self.split_rule = None
        self._num_splits = None

    def plan(self, meta: AttentionMetadata) -> None:
        self._decode = self._is_decode(meta)
        rule = self.split_rule
        self._num_splits = rule(meta.num_seqs) if rule is not None and self._decode else None

    @staticmethod
    def _is_decode(meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and meta.num_tokens == meta.num_seqs

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        self._write(key, value, kv_cache, meta.slot_mapping)

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if self._is_decode(meta):  # host ints only; same answer as plan()
            return self._decode_fn(
                query, kv_cache, meta.block_tables, meta.seq_lens, num_splits=self._num_splits
            )
        bound = max(meta.max_query_len, self._min_query_len)
        return self._prefill_fn(query, kv_cache, meta, max_query_len=bound)


class TritonKVWrite(SlotKVWrite):
    """``Op.KV_WRITE`` through the Triton kernel (one launch per layer, slot -1 writes nothing;
    graph-safe)."""

    name = "triton.kv_write"
    host_plan_per_step = False  # plan() is a no-op

    def __init__(self, ctx: KernelContext | None = None) -> None:
        from layerzero_serve.kernels._triton.kv_write import triton_write_kv

        super().__init__(triton_write_kv)


def _factory(ctx: KernelContext) -> TritonPagedAttention:
    return TritonPagedAttention(ctx)


_DTYPES = frozenset({"float16", "bfloat16", "float32"})
_HEAD_DIMS = frozenset({32, 64, 128})
_COMMON = dict(
    backend="triton",
    priority=50,
    device_types=frozenset({"cuda"}),
    dtypes=_DTYPES,
    head_dims=_HEAD_DIMS,
    min_sm=80,
    factory=_factory,
)
_DOC = "kernels/_triton/: LayerZero's own Triton kernels (paged, GQA, split-KV decode)"

SPECS = [
    KernelSpec(
        "triton.paged_decode",
        Op.ATTN_DECODE,
        graph_safe=True,
        doc=_DOC + "; decode: split count from the table width, no host sync",
        # Above FlashInfer's decode (100), in eager and graph plans alike so that greedy output
        # is identical with graphs on and off: no host planning per step (FlashInfer's decode
        # plan costs ~0.3-0.5 ms of host time every step), and a replay as fast or faster at
        # batch 1-256, context 128-2048 on H200 (bench/results/decode_kernels_gpu_h200.json).
        # FA3/FA4 (unmeasured here) stay above.
        **{**_COMMON, "priority": 102},
    ),
    KernelSpec(
        "triton.paged_prefill",
        Op.ATTN_PREFILL,
        graph_safe=False,
        doc=_DOC + "; prefill: grid sized by the step's max_query_len (host value)",
        **_COMMON,
    ),
    KernelSpec(
        "triton.paged_verify",
        Op.ATTN_VERIFY,
        graph_safe=True,
        doc=_DOC + "; verify: grid sized by the plan's fixed q_len, lengths read on device",
        **_COMMON,
    ),
    KernelSpec(
        "triton.kv_write",
        Op.KV_WRITE,
        graph_safe=True,
        doc=_DOC + "; kv_write: masked stores, negative slots write nothing",
        **{**_COMMON, "factory": TritonKVWrite},
    ),
]
