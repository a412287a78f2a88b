"""CUDA-graph capture of the decode forward (embedding to logits), one graph per batch bucket.

With ``q_len > 1`` the same runner captures speculative verification: every row carries exactly
``q_len`` query tokens (its last token, its drafts, then padding tokens with slot -1 that write
nothing), its ``seq_len`` counts all ``q_len`` so query ``j`` sits at ``seq_len - q_len + j``,
and the graph returns the logits of every token (``[batch * q_len, vocab]``). Causal attention
keeps the padding tokens, which come last, out of every real token's result.

Buckets are captured largest first into one shared memory pool, each after a warm-up run. All
graphs read the same static input buffers, filled each step by ONE host-to-device copy of a
pinned staging buffer laid out as ``[input_ids | positions | slot_mapping | seq_lens |
block_tables]`` (int32). A batch is padded to the smallest bucket that fits: padding rows get
slot -1 (they write nothing to the KV cache) and length 1 over the null block (finite outputs
that nobody reads). Each bucket has its own attention implementation, chosen by the selection
engine for that bucket's plan (graph mode on), whose ``plan()`` runs on the host before replay.

**Faults.** When a bucket kernel's host ``plan()`` (or a warm-up run) raises, the runner's
``on_kernel_failure(choice, error)`` decides: it re-raises for a locked kernel or the torch
reference, else marks the backend unhealthy; the bucket is then selected again and re-captured
(at start-up, or before the replay that failed: its inputs are staged again), so one failing
automatic kernel costs one re-capture, never the step. Without the callback the error propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kv_cache import KVCache
from layerzero_serve.runner.attention import AttentionDispatch
from layerzero_serve.selection import KernelChoice

logger = logging.getLogger("layerzero_serve")
MAX_RECAPTURES = 8  # per bucket and call: each marks one more backend unhealthy


@dataclass(slots=True)
class CapturedBucket:
    batch: int
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [batch, vocab] float32, written by every replay
    dispatch: AttentionDispatch
    meta: AttentionMetadata
    replan: bool = True  # a kernel plans on the host per step (FlashInfer): plan before replay


class DecodeGraphRunner:
    """Static buffers + one captured graph per bucket.

    Args:
        model: forward(input_ids, positions, attn, meta) -> hidden; compute_logits(hidden).
        kv_cache: the KV tensors the graphs bake in.
        dispatch_for_bucket: ``batch -> AttentionDispatch`` with that bucket's decode and
            KV-write kernels (selection once per bucket, graph mode on).
        buckets: batch sizes to capture.
        max_blocks_per_seq: width of the static block table.
        q_len: query tokens per row (1: decode; k + 1: verification of k drafts).
        on_kernel_failure: ``(choice, error) -> None`` for a bucket kernel whose host plan (or
            warm-up run) raised (``choice`` None: the error did not come from a kernel):
            re-raises when final, else marks its backend unhealthy so the bucket can be
            selected and captured again (see the module docstring).

    CUDA graphs: ``capture`` records one graph per bucket (each after a warm-up run, largest first,
    one shared memory pool); ``run`` copies a step's inputs into the static buffers and replays,
    from the host, outside any capture.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        dispatch_for_bucket: Callable[[int], AttentionDispatch],
        buckets: list[int],
        max_blocks_per_seq: int,
        device: torch.device,
        q_len: int = 1,
        on_kernel_failure: Callable[[KernelChoice | None, Exception], None] | None = None,
    ) -> None:
        self.model = model
        self.on_kernel_failure = on_kernel_failure
        self.kv_cache = kv_cache
        self.dispatch_for_bucket = dispatch_for_bucket
        self.buckets = sorted(set(buckets))
        self.max_batch = self.buckets[-1]
        self.width = max_blocks_per_seq
        self.device = device
        self.block_size = kv_cache.spec.block_size
        self.q_len = q = q_len
        b, m = self.max_batch, self.width
        # Host/device layout: [input_ids | positions | slot_mapping] (b*q each), then
        # [seq_lens] (b), then the block table (b*m).
        self._tok = bq = b * q
        self._lens_at = 3 * bq
        self._table_at = 3 * bq + b
        n = self._table_at + b * m
        self._host = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        # recorded after each staging copy: the host buffer is rewritten only once the copy out
        # of it ran (with async scheduling the next step is staged while this one is queued)
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(n, dtype=torch.int32, device=device)
        self.input_ids = self._dev[0:bq]
        self.positions = self._dev[bq : 2 * bq]
        self.slot_mapping = self._dev[2 * bq : 3 * bq]
        self.seq_lens = self._dev[self._lens_at : self._table_at]
        self.block_tables = self._dev[self._table_at :].view(b, m)
        self.query_start_loc = torch.arange(0, bq + 1, q, dtype=torch.int32, device=device)
        self.graphs: dict[int, CapturedBucket] = {}
        self._pool = None
        self._bucket_of = np.searchsorted(np.asarray(self.buckets), np.arange(b + 1))
        self.capture_seconds = 0.0
        self.graph_memory_bytes = 0

    # ---- host staging --------------------------------------------------------------------
    def _fill(self, n: int, batch: int, ids, positions, slots, seq_lens, table) -> None:
        """Rows ``[0, n)`` real, ``[n, batch)`` padding; then one H2D copy. ``ids``,
        ``positions`` and ``slots`` hold ``n * q_len`` entries (row-major)."""
        bq, q, m = self._tok, self.q_len, self.width
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies (queued before its graph)
        h = self._host_np
        nt, bt = n * q, batch * q
        h[0:nt], h[bq : bq + nt], h[2 * bq : 2 * bq + nt] = ids, positions, slots
        h[nt:bt] = 0
        h[bq + nt : bq + bt] = 0
        h[2 * bq + nt : 2 * bq + bt] = -1  # padding writes nothing
        lens = h[self._lens_at : self._table_at]
        lens[:n] = seq_lens
        lens[n:batch] = q  # ... and reads q slots of the null block
        tab = h[self._table_at :].reshape(self.max_batch, m)
        tab[:n, : table.shape[1]] = table
        tab[:n, table.shape[1] :] = 0
        tab[n:batch] = 0
        # One copy of the prefix the bucket reads (the table's rows [0, batch) come first): at
        # batch 1 a few KB instead of the whole max-bucket table, which the graph waits for.
        end = self._table_at + batch * m
        self._dev[:end].copy_(self._host[:end], non_blocking=True)

    def _meta(self, batch: int, seq_lens_cpu: list[int], max_seq_len: int) -> AttentionMetadata:
        q = self.q_len
        return AttentionMetadata(
            num_seqs=batch,
            num_tokens=batch * q,
            block_size=self.block_size,
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[: batch * q],
            max_query_len=q,
            max_seq_len=max_seq_len,
            query_start_loc_cpu=list(range(0, batch * q + 1, q)),
            seq_lens_cpu=seq_lens_cpu,
            block_tables_cpu=self._host_np[self._table_at :].reshape(self.max_batch, self.width)[
                :batch
            ],
        )

    # ---- capture ---------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        """Capture every bucket, largest first, into one memory pool."""
        t0 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        mem0 = torch.cuda.memory_reserved(self.device)
        self._pool = torch.cuda.graph_pool_handle()
        # One logits buffer shared by every bucket (outside the graph pool): a per-graph output
        # would keep sum(buckets) x vocab floats alive in the pool.
        vocab = self.model.config.vocab_size
        self.logits_out = torch.empty(
            self.max_batch * self.q_len, vocab, dtype=torch.float32, device=self.device
        )
        for batch in tqdm(
            sorted(self.buckets, reverse=True),
            desc="capture CUDA graphs",
            unit="bucket",
            disable=not progress,
        ):
            self.graphs[batch] = self._capture_bucket(batch)
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t0
        self.graph_memory_bytes = torch.cuda.memory_reserved(self.device) - mem0
        logger.info(
            "captured %d CUDA graphs (buckets %s) in %.2f s, graph memory %.1f MiB",
            len(self.graphs),
            self.buckets,
            self.capture_seconds,
            self.graph_memory_bytes / 2**20,
        )

    def _kernel_failed(self, dispatch: AttentionDispatch, error: Exception, attempt: int) -> None:
        """A bucket kernel raised on the host: the callback re-raises when final."""
        if self.on_kernel_failure is None or attempt >= MAX_RECAPTURES:
            raise error
        self.on_kernel_failure(dispatch.culprit(), error)

    def _capture_bucket(self, batch: int) -> CapturedBucket:
        """Select the bucket's kernels, plan and warm up (retried with the next candidate when
        an automatic kernel raises), then capture its graph into the shared pool."""
        max_len = self.width * self.block_size
        q = self.q_len
        ids, pos = self.input_ids[: batch * q], self.positions[: batch * q]
        for attempt in range(MAX_RECAPTURES + 1):
            dispatch = self.dispatch_for_bucket(batch)
            self._fill(0, batch, [], [], [], [], np.zeros((0, 0), np.int32))
            # Plan for the longest sequences while capturing, so kernels whose launch shape
            # depends on the plan (FlashInfer's split-KV decode) are captured in the variant
            # that covers every later plan. The padding rows' table points at the null block.
            meta = self._meta(batch, [max_len] * batch, max_len)
            try:  # host plan + eager warm-ups (autotuning, lazy inits, allocator): no capture yet
                dispatch.begin_step(meta)
                for _ in range(2):
                    self.model.compute_logits(self.model(ids, pos, dispatch, meta))
                break
            except Exception as e:
                self._kernel_failed(dispatch, e, attempt)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        logits = self.logits_out[: batch * q]
        with torch.cuda.graph(graph, pool=self._pool):
            logits.copy_(self.model.compute_logits(self.model(ids, pos, dispatch, meta)))
        kernels = [dispatch.decode, dispatch.prefill, dispatch.writer]
        replan = any(getattr(k.impl, "host_plan_per_step", True) for k in kernels if k is not None)
        return CapturedBucket(batch, graph, logits, dispatch, meta, replan)

    # ---- replay ----------------------------------------------------------------------------
    def bucket_for(self, n: int) -> int | None:
        """Smallest captured bucket >= n, or None above the largest."""
        if n > self.max_batch:
            return None
        return self.buckets[int(self._bucket_of[n])]

    def run(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        seq_lens: np.ndarray,
        table: np.ndarray,
        device_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Replay ``n = len(seq_lens)`` rows (``n * q_len`` tokens in ``ids``/``positions``/
        ``slots``); returns logits ``[n * q_len, vocab]`` (a view into the static output:
        consume before the next replay). ``device_ids`` (int64, at least ``n * q_len``, e.g.
        the previous step's sampled tokens, not yet on the host) replace ``ids``; they are
        clamped into the vocabulary, so a failed row's placeholder never reaches a gather."""
        n = len(seq_lens)
        batch = self.bucket_for(n)
        if batch is None:
            raise ValueError(f"batch {n} above the largest captured bucket {self.max_batch}")
        for attempt in range(MAX_RECAPTURES + 1):
            cap = self.graphs[batch]
            self._fill(n, batch, ids, positions, slots, seq_lens, table)
            if device_ids is not None:  # after the staging copy, which wrote placeholder ids
                nt = n * self.q_len
                vocab = cap.logits.shape[-1]
                self.input_ids[:nt].copy_(device_ids[:nt].clamp(0, vocab - 1))
            if not cap.replan:
                break
            lens = seq_lens.tolist() + [self.q_len] * (batch - n)
            try:  # host-side plan (FlashInfer) for this step's lengths
                cap.dispatch.begin_step(self._meta(batch, lens, int(max(lens))))
                break
            except Exception as e:  # nothing was replayed: re-capture, then stage again
                self._kernel_failed(cap.dispatch, e, attempt)
                self._recapture(batch)
        if self._copied is not None:  # after the plan's own staged copies, too
            self._copied.record()
        cap.graph.replay()
        return cap.logits[: n * self.q_len]

    @torch.inference_mode()
    def _recapture(self, batch: int) -> None:
        """Capture ``batch`` again with freshly selected kernels (a kernel of it failed)."""
        torch.cuda.synchronize(self.device)  # no staging copy in flight while we re-stage
        old = self.graphs.pop(batch)
        old.graph.reset()
        self.graphs[batch] = self._capture_bucket(batch)
        logger.warning(
            "re-captured the CUDA graph of bucket %d: %s", batch, self.graphs[batch].dispatch.name
        )
