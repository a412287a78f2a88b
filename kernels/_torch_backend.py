"""The torch backend: always available, on CPU and GPU. Decode-only batches use the
graph-safe ``sdpa_paged_decode`` on the CPU and the vectorised reference ``paged_decode`` on a
GPU; prefill/mixed batches the per-sequence ``paged_attention`` (host loops: not graph-safe)."""

from __future__ import annotations

import torch

from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.attention_api import ScatterKVWrite
from layerzero_serve.kernels.cpu_kv_write import PlannedKVWrite
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.sampling_api import TorchSamplingKernel
from layerzero_serve.kernels.sdpa_decode import decode_gather, sdpa_paged_decode
from layerzero_serve.kernels.spec import KV_DTYPES, KernelContext, KernelSpec, Op

ANY_DEVICE = frozenset({"cpu", "cuda"})


class TorchPagedAttention(ScatterKVWrite):
    """plan/write_kv/run over the torch reference kernels (see kernels.attention_api)."""

    def __init__(self, ctx: KernelContext | None = None) -> None:
        self.name = "torch.paged_attention"
        self._gather: tuple | None = None  # (meta, decode_gather(...)) of the planned CPU step

    def plan(self, meta: AttentionMetadata) -> None:
        super().plan(meta)
        self._gather = None
        if self._decode and meta.block_tables.device.type == "cpu":
            bs = meta.block_size
            gather = decode_gather(meta.block_tables, meta.seq_lens, bs)
            self._gather = (meta, gather, 0 in meta.seq_lens_cpu)

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if self._decode:
            # On the CPU torch's fused SDPA is about 3x faster than the reference's separate
            # passes; on a GPU the reference stays (it is the fallback every kernel is tested
            # against there, and the GPU backends rank above it anyway).
            if query.device.type == "cpu":
                planned = self._gather
                if planned is not None and planned[0] is meta:
                    return sdpa_paged_decode(
                        query, kv_cache, meta.block_tables, meta.seq_lens, gather=planned[1],
                        has_empty=planned[2],
                    )  # fmt: skip
                return sdpa_paged_decode(query, kv_cache, meta.block_tables, meta.seq_lens)
            return torch_ref.paged_decode(query, kv_cache, meta.block_tables, meta.seq_lens)
        return torch_ref.paged_attention(query, kv_cache, meta)


class TorchKVWrite(PlannedKVWrite):
    """``Op.KV_WRITE``: ``torch_ref.write_kv`` (index_put_, slot -1 skipped; graph-safe) on a GPU,
    ``cpu_write_kv`` (two index_copy_ calls, the same result; rows found once per step) on the
    CPU."""

    name = "torch.kv_write"
    host_plan_per_step = False  # plan() is a no-op

    def __init__(self, ctx: KernelContext | None = None) -> None:
        pass

    def plan(self, meta: AttentionMetadata) -> None:
        pass


def _attn(ctx: KernelContext) -> TorchPagedAttention:
    return TorchPagedAttention(ctx)


def _sampler(ctx: KernelContext) -> TorchSamplingKernel:
    return TorchSamplingKernel()


def _none(ctx: KernelContext) -> None:
    return None  # the model's own torch ops implement these: nothing to build


SPECS = [
    KernelSpec(
        "torch.paged_decode",
        Op.ATTN_DECODE,
        "torch",
        priority=0,
        graph_safe=True,
        device_types=ANY_DEVICE,
        kv_dtypes=KV_DTYPES,  # an FP8 cache is cast to the compute dtype
        factory=_attn,
        doc="CPU: kernels/sdpa_decode.py (one gather, fused SDPA); GPU: kernels/torch_ref.py "
        "(vectorised gather over the block table); no host sync",
    ),
    KernelSpec(
        "torch.paged_prefill",
        Op.ATTN_PREFILL,
        "torch",
        priority=0,
        graph_safe=False,
        device_types=ANY_DEVICE,
        kv_dtypes=KV_DTYPES,  # an FP8 cache is cast to the compute dtype
        factory=_attn,
        doc="per-sequence loop over host lengths",
    ),
    KernelSpec(
        "torch.paged_verify",
        Op.ATTN_VERIFY,
        "torch",
        priority=0,
        graph_safe=False,
        device_types=ANY_DEVICE,
        kv_dtypes=KV_DTYPES,  # an FP8 cache is cast to the compute dtype
        factory=_attn,
    ),
    KernelSpec(
        "torch.kv_write",
        Op.KV_WRITE,
        "torch",
        priority=0,
        graph_safe=True,
        device_types=ANY_DEVICE,
        factory=TorchKVWrite,
        doc="index_put_ with padding rows redirected: no host sync",
    ),
    KernelSpec(
        "torch.sampler",
        Op.SAMPLING,
        "torch",
        priority=0,
        graph_safe=True,
        device_types=ANY_DEVICE,
        factory=_sampler,
        doc="kernels/sampling_api.py: stable sort, top-k/top-p/min-p masks, inverse-CDF draw "
        "from counter-based random numbers (seed, offset) on the device; no host sync, "
        "position-invariant",
    ),
    KernelSpec(
        "torch.rmsnorm",
        Op.RMSNORM,
        "torch",
        graph_safe=True,
        device_types=ANY_DEVICE,
        factory=_none,
    ),
    KernelSpec(
        "torch.rope", Op.ROPE, "torch", graph_safe=True, device_types=ANY_DEVICE, factory=_none
    ),
    KernelSpec(
        "torch.swiglu", Op.SWIGLU, "torch", graph_safe=True, device_types=ANY_DEVICE, factory=_none
    ),
    KernelSpec(
        "torch.rejection_sampling",
        Op.REJECTION_SAMPLING,
        "torch",
        priority=0,
        graph_safe=True,
        device_types=ANY_DEVICE,
        factory=torch_ref.TorchRejectionSampler,
        doc="kernels/torch_ref.py: vectorised gathers, no host sync",
    ),
]
