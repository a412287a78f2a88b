"""FlashInfer adapters: paged decode and paged prefill/extend through FlashInfer's plan/run.

Our KV layout ``[num_blocks, 2, block_size, Hkv, D]`` is FlashInfer's paged "NHD" layout, so
the cache is passed as is. ``plan`` turns the block tables into FlashInfer's CSR page lists
(indptr, indices, last_page_len) on the host (``meta.block_tables_cpu``) and plans the wrapper
once per step; ``run`` is per layer. In graph mode the decode wrapper is built with
``use_cuda_graph=True`` over fixed index buffers sized for its bucket; ``plan`` refills them.
KV writes use the graph-safe torch scatter (``torch_ref.write_kv``).

Constraints (FlashInfer documentation, 0.7.x): fp16/bf16 query and KV; head_dim 64/128/256
(only 128 is prebuilt in this project's GPU bundle, others JIT-compile on first use: a
priority matter, not a constraint); any page size; SM 75+ for decode (CUDA-core kernels), SM 80+
for prefill.
"""

from __future__ import annotations

import numpy as np
import torch

from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op

_WORKSPACE_BYTES = 256 << 20
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _page_lists(meta: AttentionMetadata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr [B+1], indices [sum pages], last_page_len [B]) as int32 host arrays."""
    bs = meta.block_size
    lens = np.asarray(meta.seq_lens_cpu, dtype=np.int64)
    pages = np.maximum(-(-lens // bs), 1)
    indptr = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(pages, out=indptr[1:])
    table = meta.block_tables_cpu
    if table is None:
        table = meta.block_tables.cpu().numpy()
    mask = np.arange(table.shape[1])[None, :] < pages[:, None]
    indices = table[mask].astype(np.int32)
    last = (lens - (pages - 1) * bs).astype(np.int32)
    last = np.maximum(last, 1)
    return indptr, indices, last


_workspaces: dict[int, torch.Tensor] = {}


def shared_workspace(device: torch.device | None = None) -> torch.Tensor:
    """One FlashInfer workspace per device, shared by every wrapper: wrappers plan and run one
    after another (one step, one bucket at a time), never concurrently. Allocated as a normal
    (non-inference) tensor so planning works inside and outside ``torch.inference_mode``."""
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    ws = _workspaces.get(index)
    if ws is None:
        with torch.inference_mode(False):
            ws = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=f"cuda:{index}")
        _workspaces[index] = ws
    return ws


class _Base:
    def __init__(self, ctx: KernelContext) -> None:
        import flashinfer  # noqa: F401  (lazy: only when the kernel is built)

        self.ctx = ctx
        self.dtype = _DTYPES[ctx.dtype]
        self.workspace = shared_workspace()

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        _write_kv()(key, value, kv_cache, meta.slot_mapping)


def _write_kv():
    """The project's Triton KV write (one kernel, graph-safe) when present, else the torch
    scatter; both skip slot -1."""
    try:
        from layerzero_serve.kernels.triton.kv_write import triton_write_kv
    except ImportError:
        return torch_ref.write_kv
    return triton_write_kv


class FlashInferDecode(_Base):
    """BatchDecodeWithPagedKVCacheWrapper; graph mode owns fixed buffers for its bucket."""

    def __init__(self, ctx: KernelContext) -> None:
        super().__init__(ctx)
        import flashinfer

        self.name = "flashinfer.decode"
        self._flashinfer = flashinfer
        self._wrapper = None
        if not ctx.graph_mode:
            with torch.inference_mode(False):  # its buffers are refilled by every plan()
                self._wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")

    def _graph_wrapper(self, meta: AttentionMetadata):
        b = self.ctx.batch_bucket
        width = meta.block_tables.shape[1]
        with torch.inference_mode(False):  # refilled by plan() inside and outside inference
            self._indptr = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
            self._indices = torch.zeros(b * width, dtype=torch.int32, device="cuda")
            self._last = torch.zeros(b, dtype=torch.int32, device="cuda")
            return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                paged_kv_indptr_buffer=self._indptr,
                paged_kv_indices_buffer=self._indices,
                paged_kv_last_page_len_buffer=self._last,
            )

    def plan(self, meta: AttentionMetadata) -> None:
        if self._wrapper is None:
            self._wrapper = self._graph_wrapper(meta)
        indptr, indices, last = _page_lists(meta)
        c = self.ctx
        self._wrapper.plan(
            torch.from_numpy(indptr),
            torch.from_numpy(indices),
            torch.from_numpy(last),
            c.num_q_heads,
            c.num_kv_heads,
            c.head_dim,
            meta.block_size,
            pos_encoding_mode="NONE",
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self._wrapper.run(query, kv_cache)


class FlashInferPrefill(_Base):
    """BatchPrefillWithPagedKVCacheWrapper, causal: prefill, extend over a cached prefix,
    chunked prefill and mixed batches (decode rows are q_len 1), and verification."""

    def __init__(self, ctx: KernelContext) -> None:
        super().__init__(ctx)
        import flashinfer

        self.name = "flashinfer.prefill"
        with torch.inference_mode(False):
            self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")

    def plan(self, meta: AttentionMetadata) -> None:
        indptr, indices, last = _page_lists(meta)
        qo = torch.tensor(meta.query_start_loc_cpu, dtype=torch.int32)
        c = self.ctx
        self._wrapper.plan(
            qo,
            torch.from_numpy(indptr),
            torch.from_numpy(indices),
            torch.from_numpy(last),
            c.num_q_heads,
            c.num_kv_heads,
            c.head_dim,
            meta.block_size,
            causal=True,
            pos_encoding_mode="NONE",
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )
        self._num_tokens = meta.query_start_loc_cpu[-1]

    def run(
        self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n = self._num_tokens
        if n == query.shape[0]:
            return self._wrapper.run(query, kv_cache)
        out = torch.zeros_like(query)  # padding tokens beyond the last sequence
        out[:n] = self._wrapper.run(query[:n], kv_cache)
        return out


_FP = frozenset(_DTYPES)
_HEADS = frozenset({64, 128, 256})
DOC = "FlashInfer 0.7 docs: BatchDecode/BatchPrefillWithPagedKVCacheWrapper (NHD, fp16/bf16)"

SPECS = [
    KernelSpec(
        "flashinfer.decode",
        Op.ATTN_DECODE,
        "flashinfer",
        priority=100,
        graph_safe=True,
        dtypes=_FP,
        head_dims=_HEADS,
        min_sm=75,
        factory=FlashInferDecode,
        doc=DOC,
    ),
    KernelSpec(
        "flashinfer.prefill",
        Op.ATTN_PREFILL,
        "flashinfer",
        priority=100,
        graph_safe=False,
        dtypes=_FP,
        head_dims=_HEADS,
        min_sm=80,
        factory=FlashInferPrefill,
        doc=DOC,
    ),
    KernelSpec(
        "flashinfer.verify",
        Op.ATTN_VERIFY,
        "flashinfer",
        priority=100,
        graph_safe=False,
        dtypes=_FP,
        head_dims=_HEADS,
        min_sm=80,
        factory=FlashInferPrefill,
        doc=DOC + "; q_len k+1 through the prefill wrapper",
    ),
]
# FlashInfer sampling (flashinfer.sampling *_from_probs) is declared when the sampler can run
# it (sampling issue); declaring it earlier would make doctor report a kernel nobody calls.
