"""FlashInfer adapters: paged decode and paged prefill/extend through FlashInfer's plan/run,
paged KV append (``flashinfer.page.append_paged_kv_cache``) and sampling
(``flashinfer.sampling``).

Our KV layout ``[num_blocks, 2, block_size, Hkv, D]`` is FlashInfer's paged "NHD" layout, so
the cache is passed as is. ``plan`` turns the block tables into FlashInfer's CSR page lists
(indptr, indices, last_page_len) on the host (``meta.block_tables_cpu``) and plans the wrapper
once per step; ``run`` is per layer. In graph mode the decode wrapper is built with
``use_cuda_graph=True`` over fixed index buffers sized for its bucket; ``plan`` refills them.
The attention adapters' own ``write_kv`` uses the project's Triton KV write; the runner
normally writes K/V through the ``Op.KV_WRITE`` kernel it selected, which may be
:class:`FlashInferKVAppend`.

Constraints (FlashInfer documentation, 0.7.x): fp16/bf16 query and KV; head_dim 64/128/256
(only 128 is prebuilt in this project's GPU bundle, others JIT-compile on first use: a
priority matter, not a constraint); any page size; SM 75+ for decode (CUDA-core kernels), SM 80+
for prefill.
"""

from __future__ import annotations

import numpy as np
import torch

from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels.block_layout import build_positions
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
        from layerzero_serve.kernels._triton.kv_write import triton_write_kv
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


class FlashInferKVAppend:
    """``Op.KV_WRITE`` through ``flashinfer.page.append_paged_kv_cache``.

    ``plan`` builds, on the host, the page lists and each real token's (batch index, position)
    and copies them to the device in one transfer; ``write`` appends the first ``nnz`` tokens
    (those inside ``query_start_loc``; trailing padding tokens are never written). Not
    graph-safe: the token count is a host value of the step.
    """

    name = "flashinfer.append_kv"

    def __init__(self, ctx: KernelContext | None = None) -> None:
        from flashinfer.page import append_paged_kv_cache

        self._append = append_paged_kv_cache
        self._nnz = 0

    def plan(self, meta: AttentionMetadata) -> None:
        indptr, indices, last = _page_lists(meta)
        q_lens = np.diff(np.asarray(meta.query_start_loc_cpu, dtype=np.int64))
        lens = np.asarray(meta.seq_lens_cpu, dtype=np.int64)
        # token j of sequence i sits at position seq_len_i - q_len_i + j
        batch_idx, positions = build_positions(lens - q_lens, q_lens)
        nnz = len(positions)
        parts = (indptr, last, indices, batch_idx, positions)
        packed = torch.from_numpy(np.concatenate(parts).astype(np.int32))
        dev = packed.to(meta.slot_mapping.device, non_blocking=True)
        views, at = [], 0
        for part in parts:
            views.append(dev[at : at + len(part)])
            at += len(part)
        self._indptr, self._last, self._indices, self._batch, self._pos = views
        self._nnz = nnz

    def write(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        n = self._nnz
        if n == 0:
            return
        self._append(
            key[:n],
            value[:n],
            self._batch,
            self._pos,
            kv_cache,
            self._indices,
            self._indptr,
            self._last,
            "NHD",
        )


class FlashInferSampling:
    """``Op.SAMPLING`` through ``flashinfer.sampling`` (see ``kernels.sampling_api``): top-k
    renormalisation, then top-p renormalisation over the kept tokens, then min-p sampling,
    i.e. the reference order top-k -> top-p -> min-p. Rejection-based, no sort, no host sync;
    random state from the ``seed``/``offset`` tensors (graph-safe).

    ``position_invariant`` is False: FlashInfer feeds the row index into its Philox stream, so
    a seeded row's draw depends on its batch position. The sampler routes batches holding
    seeded rows to a position-invariant kernel.
    """

    name = "flashinfer.sampling"
    position_invariant = False

    def __init__(self, ctx: KernelContext | None = None) -> None:
        import flashinfer.sampling as fs

        self._fs = fs

    def sample(
        self,
        probs: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        min_p: torch.Tensor,
        seed: torch.Tensor,
        offset: torch.Tensor,
    ) -> torch.Tensor:
        """probs float32 ``[B, V]``; top_k int32 ``[B]``; top_p/min_p float32 ``[B]``;
        seed/offset int64 ``[B]`` -> int64 ``[B]``."""
        fs = self._fs
        kept = fs.top_k_renorm_probs(probs, top_k)
        kept = fs.top_p_renorm_probs(kept, top_p)
        out = fs.min_p_sampling_from_probs(kept, min_p, seed=seed, offset=offset)
        return out.long()


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
    KernelSpec(
        "flashinfer.append_kv",
        Op.KV_WRITE,
        "flashinfer",
        priority=40,  # below triton.kv_write (50): one launch and no host plan per step
        graph_safe=False,
        dtypes=_FP,
        min_sm=75,
        factory=FlashInferKVAppend,
        doc="FlashInfer 0.7 docs: flashinfer.page.append_paged_kv_cache (NHD, ragged append)",
    ),
    KernelSpec(
        "flashinfer.sampling",
        Op.SAMPLING,
        "flashinfer",
        priority=100,
        graph_safe=True,
        min_sm=75,
        factory=FlashInferSampling,
        doc="FlashInfer 0.7 docs: top_k/top_p_renorm_probs + min_p_sampling_from_probs "
        "(seed/offset tensors for CUDA graphs; not position-invariant)",
    ),
]
