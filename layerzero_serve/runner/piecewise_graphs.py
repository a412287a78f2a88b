"""CUDA graphs for the steps the decode graphs cannot take: prefill chunks and mixed
prefill + decode steps, captured piecewise around attention, one set per token-count bucket.

A step of ``T`` packed tokens (any mix of prefill chunks and decode rows) is padded to the
smallest bucket ``B >= T``. For each bucket the model's forward is recorded once as ``L + 1``
graphs (``L`` attention calls): piece 0 runs the embedding, the RoPE tables and layer 0 up to
its attention call; piece ``i`` runs the rest of layer ``i - 1`` (output projection, residual,
norms, MLP) and layer ``i`` up to its attention; the last piece ends at the final norm. Between
replays, attention runs eagerly over the ``T`` real tokens with the step's own metadata and the
eager (prefill/mixed) kernels: its launch shape depends on the sequence lengths, which change
every step, while everything else depends only on ``T``. A Llama-shaped layer launches about a
dozen kernels besides attention; here they cost one graph launch.

How the pieces are cut: the model runs once under capture with an attention callable that ends
the current graph at each call, copies ``q``/``k``/``v`` into static buffers first (so one
buffer per tensor serves every layer, instead of keeping each layer's activations alive in the
pool), starts the next graph and returns a static output buffer the next piece reads. Any
model that calls attention through ``attn(layer_idx, q, k, v, meta)`` is cut this way; nothing
in the model changes. The padding tokens (``[T, B)``: id 0, position 0) are computed by the
pieces and never attended to or written to the KV cache; rows are independent in every piece,
so they cannot change the real tokens' results.

Buckets are captured largest first into one memory pool: the pieces of a bucket replay in
order and buckets never interleave, so memory a piece frees may serve the next one.

Without CUDA (``capture=False``) ``run`` goes through the same static buffers, padding and
attention slicing, executing the forward eagerly instead of replaying: the CPU tests check that
path against the plain forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from layerzero_serve.kernels.metadata import AttentionMetadata

logger = logging.getLogger("layerzero_serve")

#: Default token buckets: at most 1.5x padding above 128 tokens, 2x below.
DEFAULT_TOKEN_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata],
                       torch.Tensor]  # fmt: skip


def token_buckets(max_tokens: int) -> list[int]:
    """The default buckets up to ``max_tokens`` (which is always the largest bucket)."""
    if max_tokens < 1:
        return []
    return sorted({b for b in DEFAULT_TOKEN_BUCKETS if b < max_tokens} | {max_tokens})


@dataclass(slots=True)
class _Piece:
    """One captured piece; ``layer`` is the attention call that follows it (None: the last)."""

    graph: torch.cuda.CUDAGraph | None
    layer: int | None


@dataclass(slots=True)
class _Bucket:
    tokens: int
    pieces: list[_Piece] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # [tokens, hidden], written by the last piece


class _Cutter:
    """The attention callable the model sees while a bucket is captured: ends the current
    piece at each attention call and starts the next one (see the module docstring)."""

    def __init__(self, runner: PiecewiseGraphRunner, bucket: _Bucket, capture: bool) -> None:
        self.r, self.bucket, self.capture = runner, bucket, capture

    def begin(self) -> None:
        graph = None
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=self.r.pool)
        self.bucket.pieces.append(_Piece(graph, None))

    def end(self, layer: int | None) -> None:
        piece = self.bucket.pieces[-1]
        piece.layer = layer
        if piece.graph is not None:
            piece.graph.capture_end()

    def __call__(self, layer_idx, q, k, v, meta) -> torch.Tensor:
        n = q.shape[0]
        self.r.stage_qkv(q, k, v)
        self.end(layer_idx)
        self.begin()
        return self.r.attn_out[:n]


class PiecewiseGraphRunner:
    """Static buffers and the pieces of every token bucket.

    Args:
        model: ``forward(input_ids [T], positions [T], attn, meta) -> hidden [T, H]``.
        num_heads, num_kv_heads, head_dim, dtype: the attention shapes (q is
            ``[T, num_heads, head_dim]``, k and v ``[T, num_kv_heads, head_dim]``).
        buckets: token counts to capture (the largest bounds what ``run`` accepts).
        device: the model's device.
        capture: record CUDA graphs (CUDA only); False runs the same path eagerly.

    CUDA graphs: ``capture_all`` records the graphs (host, outside any other capture); ``run``
    replays them from the host with eager attention in between.
    """

    def __init__(self, model, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, buckets: list[int], device: torch.device,
                 capture: bool = True) -> None:  # fmt: skip
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets: positive token counts required, got {buckets}")
        if capture and device.type != "cuda":
            raise ValueError(f"capture: CUDA graphs need a CUDA device, got {device}")
        self.model, self.device, self.capture = model, device, capture
        self.buckets = sorted(set(buckets))
        self.max_tokens = m = self.buckets[-1]
        self._bucket_of = np.searchsorted(np.asarray(self.buckets), np.arange(m + 1))
        self.input_ids = torch.zeros(m, dtype=torch.int64, device=device)
        self.positions = torch.zeros(m, dtype=torch.int64, device=device)
        self.q = torch.zeros(m, num_heads, head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(m, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.attn_out = torch.zeros_like(self.q)
        self.graphs: dict[int, _Bucket] = {}
        self.pool = None
        self.capture_seconds = 0.0
        self.graph_memory_bytes = 0
        self.replays = 0  # steps served (a counter for benchmarks and stats)

    def stage_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Copy one layer's ``q``/``k``/``v`` (``[B, heads, D]``) into the static buffers
        (captured into the piece that produced them)."""
        n = q.shape[0]
        self.q[:n].copy_(q)
        self.k[:n].copy_(k)
        self.v[:n].copy_(v)

    # ---- capture ---------------------------------------------------------------------------
    def bucket_for(self, tokens: int) -> int | None:
        """Smallest bucket >= ``tokens``, or None above the largest (or for 0 tokens)."""
        if tokens < 1 or tokens > self.max_tokens:
            return None
        return self.buckets[int(self._bucket_of[tokens])]

    @torch.inference_mode()
    def capture_all(self, progress: bool = True) -> None:
        """Record every bucket, largest first, into one pool (eager mode: nothing to record)."""
        if not self.capture:
            return
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        mem0 = torch.cuda.memory_reserved(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for tokens in tqdm(sorted(self.buckets, reverse=True), desc="capture mixed-step graphs",
                           unit="bucket", disable=not progress):  # fmt: skip
            self.graphs[tokens] = self._capture_bucket(tokens, stream)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        self.graph_memory_bytes = torch.cuda.memory_reserved(self.device) - mem0
        logger.info(
            "captured mixed-step graphs for %d token buckets (%s) in %.2f s, %.1f MiB",
            len(self.graphs), self.buckets, self.capture_seconds, self.graph_memory_bytes / 2**20,
        )  # fmt: skip

    def _capture_bucket(self, tokens: int, stream: torch.cuda.Stream) -> _Bucket:
        ids, pos = self.input_ids[:tokens], self.positions[:tokens]
        # warm-up on the capture stream (cuBLAS handles and workspaces, lazy inits): eager
        warm = _Bucket(tokens)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            cutter = _Cutter(self, warm, capture=False)
            cutter.begin()
            self.model(ids, pos, cutter, None)
            torch.cuda.synchronize(self.device)
            bucket = _Bucket(tokens)
            cutter = _Cutter(self, bucket, capture=True)
            cutter.begin()
            try:
                bucket.hidden = self.model(ids, pos, cutter, None)
            finally:  # also on an error: the stream must leave capture mode
                cutter.end(None)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return bucket

    # ---- replay ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionFn,
            meta: AttentionMetadata) -> torch.Tensor:  # fmt: skip
        """``input_ids``/``positions`` ``[T]`` (device) of one step, ``attn`` its eager
        attention (``begin_step`` already called with ``meta``) -> hidden ``[T, H]``, a view
        into a static buffer: consume it before the next ``run``. Raises ``ValueError`` when
        ``T`` has no bucket; whatever ``attn`` raises propagates (re-running the step is
        idempotent: it rewrites the same KV slots)."""
        t = input_ids.shape[0]
        size = self.bucket_for(t)
        if size is None:
            raise ValueError(f"tokens: 1..{self.max_tokens} per step, got {t}")
        self.replays += 1
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.input_ids[t:size].zero_()
        self.positions[t:size].zero_()
        if not self.capture:
            return self._run_eager(size, t, attn, meta)
        bucket = self.graphs[size]
        for piece in bucket.pieces:
            piece.graph.replay()
            if piece.layer is not None:
                self._attend(piece.layer, t, attn, meta)
        return bucket.hidden[:t]

    def _attend(self, layer: int, t: int, attn: AttentionFn, meta: AttentionMetadata) -> None:
        """Eager attention of one layer over the ``t`` real tokens, into the static output."""
        self.attn_out[:t].copy_(attn(layer, self.q[:t], self.k[:t], self.v[:t], meta))

    def _run_eager(self, size: int, t: int, attn: AttentionFn, meta) -> torch.Tensor:
        """The replay's data flow without graphs: the forward at the bucket's size, each
        attention call staged through the static buffers exactly as the pieces are."""

        def cut(layer_idx, q, k, v, _meta):
            self.stage_qkv(q, k, v)
            self._attend(layer_idx, t, attn, meta)
            return self.attn_out[: q.shape[0]]

        return self.model(self.input_ids[:size], self.positions[:size], cut, None)[:t]
