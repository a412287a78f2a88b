"""Executes one scheduled step: inputs -> forward -> logits of sampling rows -> tokens.

Kernels are chosen once per plan at construction (``select`` per phase); each step only reads
the decisions. An automatically chosen kernel that raises marks its backend unhealthy, the
plans are re-selected (the next candidate takes over) and the step is retried; a locked
kernel's failure, or the torch reference's, propagates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from layerzero_serve.kernels.spec import Op
from layerzero_serve.kv_cache import BlockTableCache, KVCache
from layerzero_serve.runner._input_batch import prepare_batch
from layerzero_serve.runner._non_finite import REFERENCE_BACKEND, blame_non_finite
from layerzero_serve.runner._sampler_graphs import SamplerGraphs
from layerzero_serve.runner.attention import (
    AttentionDispatch,
    select_dispatch,
)
from layerzero_serve.runner.cuda_graph import DecodeGraphRunner
from layerzero_serve.runner.piecewise_graphs import PiecewiseGraphRunner, token_buckets
from layerzero_serve.sampling import Sampler, any_prompt_logprobs, prompt_logprobs
from layerzero_serve.selection import KernelChoice, Selector, get_selector, probe_device
from layerzero_serve.selection.plans import ModelShape, base_context
from layerzero_serve.types import SchedulerOutput, StepTokens

logger = logging.getLogger("layerzero_serve")
MAX_FALLBACKS = 16  # kernel failures one step may fall back from (each one a new backend)


@dataclass(slots=True)
class StepTimings:
    """Cumulative host wall time per phase, in seconds (GPU phases are synchronised only when
    ``sync`` is set, otherwise device time lands in whichever phase waits for it)."""

    schedule: float = 0.0
    prepare: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    update: float = 0.0
    steps: int = 0
    sync: bool = False

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("schedule", "prepare", "forward", "sample", "update")}


class ModelRunner:
    """Owns the model, the KV tensors, the attention dispatch and the sampler."""

    def __init__(
        self,
        model: torch.nn.Module,
        shape: ModelShape,
        kv_cache: KVCache,
        sampler: Sampler,
        device: torch.device,
        max_num_seqs: int,
        selector: Selector | None = None,
        verifier=None,
        mirror=None,
    ) -> None:
        self.model = model
        # tensor parallelism, rank 0: ``distributed.StepMirror`` sends every piece of model
        # work to the workers just before it runs here (None: one rank)
        self.mirror = mirror
        self._sharded = getattr(model, "tp", None) is not None  # a tensor-parallel rank
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = device
        self.selector = selector or get_selector()
        dev = probe_device(device)
        bs = kv_cache.spec.block_size
        # the eager plans (q_len 1: decode and sampling; 0: any length), selected once each
        self.plans = {
            op: base_context(
                op,
                device=dev,
                shape=shape,
                block_size=bs,
                batch_bucket=max_num_seqs,
                q_len=q_len,
                graph_mode=False,
            )
            for op, q_len in (
                (Op.ATTN_DECODE, 1),
                (Op.ATTN_PREFILL, 0),
                (Op.KV_WRITE, 0),
                (Op.SAMPLING, 1),
            )
        }
        self._dev_info, self._shape = dev, shape
        self._split_cfg: tuple[list[int], int] | None = None  # set_decode_buckets
        self.attn = self._select_kernels()
        sampler.bind(device, shape.vocab_size, max_num_seqs, self.selector, self.plans[Op.SAMPLING])
        self.timings = StepTimings()
        self._tables = BlockTableCache()  # block-table rows kept between steps
        self.graphs: DecodeGraphRunner | None = None
        self.sampler_graphs: SamplerGraphs | None = None  # sampling replayed per (bucket, plan)
        # speculative verification (``spec_decode.SpecVerifier``); None: no speculation
        self.spec_verifier = verifier
        self.verify_graphs: DecodeGraphRunner | None = None
        self.mixed_graphs: PiecewiseGraphRunner | None = None  # prefill / mixed steps

    # ---- CUDA graphs -------------------------------------------------------------------------
    def disable_graphs(self) -> None:
        """Run every step eagerly from now on (e.g. after a failed capture): drops the decode
        sampler and mixed-step graphs. Host only."""
        self.graphs = self.sampler_graphs = self.mixed_graphs = None

    def enable_mixed_graphs(self, max_tokens: int, capture: bool | None = None,
                            progress: bool = True) -> None:  # fmt: skip
        """Prefill and mixed steps of up to ``max_tokens`` tokens through piecewise graphs
        (``runner/piecewise_graphs.py``); ``capture=False`` runs the same data path eagerly
        (default: capture on CUDA)."""
        s, dtype = self._shape, next(self.model.parameters()).dtype
        capture = self.device.type == "cuda" if capture is None else capture
        self.mixed_graphs = PiecewiseGraphRunner(
            self.model, s.num_q_heads, s.num_kv_heads, s.head_dim, dtype,
            token_buckets(max_tokens), self.device, capture,
        )  # fmt: skip
        self.mixed_graphs.capture_all(progress)

    def set_decode_buckets(self, buckets: list[int], max_model_len: int) -> None:
        """Make eager decode split each sequence's KV exactly as the captured bucket it would
        pad to (same split count, hence the same numerics): with this, greedy output is the same
        with graphs on and off. Called with the graph buckets even when graphs are off."""
        width = -(-max_model_len // self.kv_cache.spec.block_size)
        self._split_cfg = (sorted(buckets), width * self.kv_cache.spec.block_size)
        self._apply_split_rule(self.attn.decode.impl)

    def _apply_split_rule(self, impl: object) -> None:
        cfg = self._split_cfg
        if cfg is None or not hasattr(impl, "split_rule") or self.device.type != "cuda":
            return
        from layerzero_serve.kernels.split_kv import choose_num_splits, num_sms

        buckets, bound = cfg
        heads, sms = self._shape.num_kv_heads, num_sms(self.device)
        ceiling = np.asarray(buckets)

        def rule(n: int) -> int:
            i = int(np.searchsorted(ceiling, n))
            return choose_num_splits(int(ceiling[i]) if i < len(ceiling) else n, heads, bound, sms)

        impl.split_rule = rule

    def _bucket_dispatch(self, op: Op, q_len: int, batch: int) -> AttentionDispatch:
        """The attention (``op`` with ``q_len`` tokens per row) and KV-write kernels of one
        captured bucket, each selected once for that bucket's plan (graph mode on)."""
        bs = self.kv_cache.spec.block_size
        attn = base_context(
            op,
            device=self._dev_info,
            shape=self._shape,
            block_size=bs,
            batch_bucket=batch,
            q_len=q_len,
            graph_mode=True,
        )
        write = base_context(
            Op.KV_WRITE,
            device=self._dev_info,
            shape=self._shape,
            block_size=bs,
            batch_bucket=batch,
            q_len=1,
            graph_mode=True,
        )
        dispatch = select_dispatch(self.kv_cache, self.selector, attn, write)
        self._apply_split_rule(dispatch.decode.impl)
        return dispatch

    def _capture(self, op: Op, buckets: list[int], max_model_len: int, q_len: int, progress):
        width = -(-max_model_len // self.kv_cache.spec.block_size)
        graphs = DecodeGraphRunner(
            self.model,
            self.kv_cache,
            partial(self._bucket_dispatch, op, q_len),
            buckets,
            width,
            self.device,
            q_len,
            on_kernel_failure=self._graph_kernel_failed,
        )
        with torch.inference_mode():
            graphs.capture(progress)
        return graphs

    def enable_graphs(self, buckets: list[int], max_model_len: int, progress: bool = True) -> None:
        """Capture the decode forward for every bucket (needs CUDA)."""
        self.graphs = self._capture(Op.ATTN_DECODE, buckets, max_model_len, 1, progress)
        self.sampler_graphs = SamplerGraphs(self.sampler, self.graphs.logits_out)

    def enable_verify_graphs(
        self, buckets: list[int], max_model_len: int, q_len: int, progress: bool = True
    ) -> None:
        """Capture verification (``q_len`` tokens per row) for every bucket (needs CUDA)."""
        self.verify_graphs = self._capture(Op.ATTN_VERIFY, buckets, max_model_len, q_len, progress)

    def _graph_logits(self, out: SchedulerOutput) -> torch.Tensor | None:
        """Logits of a pure decode step through the captured graphs, or None to run eagerly."""
        g = self.graphs
        n = len(out.requests)
        # (a 1-token prefill chunk short of the prompt's end is not a decode row: no sampling)
        if g is None or n > g.max_batch or not out.is_pure_decode():
            return None
        ids, starts, slots, table = self.decode_inputs(out)
        if self.mirror is not None:
            self.mirror.decode(ids, starts, slots, table)
        return g.run(ids, starts, slots, starts + 1, table)

    def decode_inputs(self, out: SchedulerOutput, ids_known: bool = True) -> tuple:
        """Host inputs of a pure decode step (one token per row) for the decode graphs:
        ``(ids, starts, slots, table)``, int64 ``[n]`` x3 and the cached block table (a view,
        staged by ``DecodeGraphRunner.run``). ``ids_known=False``: the ids are placeholders
        (zeros), for a step whose input ids are copied on the device."""
        n = len(out.requests)
        bs = self.kv_cache.spec.block_size
        starts = np.asarray(out.starts, dtype=np.int64)
        table = self._tables.build(out.block_ids, out.table_edits, copy=False)
        if ids_known:
            ids = np.fromiter(
                (r.all_token_ids[s] for r, s in zip(out.requests, out.starts, strict=True)),
                dtype=np.int64,
                count=n,
            )
        else:
            ids = np.zeros(n, dtype=np.int64)
        slots = table[np.arange(n), starts // bs].astype(np.int64) * bs + starts % bs
        return ids, starts, slots, table

    def _select_kernels(self) -> AttentionDispatch:
        p = self.plans
        attn = select_dispatch(
            self.kv_cache, self.selector, p[Op.ATTN_DECODE], p[Op.KV_WRITE], p[Op.ATTN_PREFILL]
        )
        self._apply_split_rule(attn.decode.impl)
        logger.info("eager kernels: %s", attn.name)
        return attn

    def plan_fingerprint(self) -> dict[str, str]:
        """``{op: kernel}`` of every model-side choice (layer kernels, eager attention, each
        captured bucket's attention): tensor-parallel ranks must agree on all of them."""
        a = self.attn
        fp = {f"layer.{k}": v for k, v in getattr(self.model, "layer_kernels", {}).items()}
        fp["eager.decode"], fp["eager.prefill"] = a.decode.choice.name, a.prefill.choice.name
        if a.writer is not None:
            fp["eager.kv_write"] = a.writer.choice.name
        for kind, g in (("decode", self.graphs), ("verify", self.verify_graphs)):
            for b, cap in ({} if g is None else g.graphs).items():
                fp[f"graph.{kind}.b{b}"] = cap.dispatch.name
        return fp

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[S, vocab]`` of hidden rows ``[S, hidden]`` (under tensor
        parallelism the workers get the rows first and join the gather)."""
        if self.mirror is not None:
            self.mirror.logits(hidden)
        return self.model.compute_logits(hidden)

    def copy_blocks(self, pairs) -> None:
        """The step's copy-on-write block copies ``(src, dst)``, on every rank."""
        if not pairs:
            return
        if self.mirror is not None:
            self.mirror.copy_blocks(pairs)
        self.kv_cache.copy_blocks(pairs)

    def _sync(self) -> None:
        if self.timings.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward_batch(self, batch) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of ``batch`` (a ``ForwardBatch``), through the mixed
        graphs when a bucket fits, else eagerly; kernels that fail fall back (one rank)."""
        mixed = self.mixed_graphs
        if mixed is not None and mixed.bucket_for(batch.input_ids.shape[0]) is None:
            mixed = None  # more tokens than the largest bucket: eager
        for attempt in range(MAX_FALLBACKS + 1):
            try:
                self.attn.begin_step(batch.meta)  # a plan() that raises falls back too
                if mixed is not None:  # hidden is a view into its static buffer
                    return mixed.run(batch.input_ids, batch.positions, self.attn, batch.meta)
                return self.model(batch.input_ids, batch.positions, self.attn, batch.meta)
            except Exception as e:
                # Re-running the step rewrites the same K/V slots: the retry is idempotent.
                # Under tensor parallelism the other ranks already ran it: no retry.
                if (
                    attempt == MAX_FALLBACKS
                    or self._sharded
                    or not self._fall_back(self.attn.culprit(), e)
                ):
                    raise
        raise AssertionError("unreachable")

    def _graph_kernel_failed(self, culprit: KernelChoice | None, error: Exception) -> None:
        """``DecodeGraphRunner``'s callback: re-raise ``error`` when final (see ``_fall_back``);
        else the backend is marked unhealthy and the graph runner re-captures the bucket."""
        if not self._fall_back(culprit, error):
            raise error

    def _fall_back(self, culprit: KernelChoice | None, error: Exception) -> bool:
        """An attention / KV-write kernel raised: False when that is final (no kernel to blame,
        a locked kernel or the torch reference); else mark its backend unhealthy (unless it
        already is: a kernel selected before another plan's failure), re-select the eager
        kernels, return True."""
        if culprit is None:  # the model raised, not a kernel of the dispatch
            return False
        backend = culprit.spec.backend
        if culprit.locked or backend == REFERENCE_BACKEND:
            return False
        if backend not in self.selector.unhealthy():
            self.selector.mark_unhealthy(backend, error)
        self.attn = self._select_kernels()
        return True

    # ---- sampling kernels that return junk ------------------------------------------------
    def check_sampling_kernel(self, res, requests: list) -> None:
        """For a step sampled without ``execute`` (async scheduling's ``collect_decode``): when
        rows got ids outside the vocabulary, blame the sampling kernel (its rows stay failed:
        the logits are gone) and drop the sampler graphs captured with it. Host only."""
        if self.sampler.blame_bad_output(res, requests):
            self._drop_sampler_graphs()

    def _drop_sampler_graphs(self) -> None:
        """A sampling kernel was replaced: graphs captured with it are stale."""
        if self.sampler_graphs is not None:
            self.sampler_graphs = SamplerGraphs(self.sampler, self.graphs.logits_out)

    # ---- kernels that return NaN / inf -------------------------------------------------------
    def _blame_non_finite(self, batch, hidden: torch.Tensor, rows) -> bool:
        """Rows of an eager step failed: True when a kernel was blamed and replaced (run the
        step again); see ``runner/_non_finite.py``."""
        if self._sharded:  # a re-run here would leave the other ranks behind
            return False
        if not blame_non_finite(self, batch, hidden, rows):
            return False
        self.attn = self._select_kernels()
        return True

    # ---- speculative verification ------------------------------------------------------------
    def _graph_verify(self, out: SchedulerOutput, results) -> tuple | None:
        """A step of decode-like rows (some with drafts) through the verification graphs:
        verifies the drafted rows (their tokens go into ``results``) and returns
        ``(logits of the other rows, their row indices)``; None when it does not fit."""
        g = self.verify_graphs
        reqs, starts, counts = out.requests, out.starts, out.num_scheduled
        n, q = len(reqs), g.q_len
        if n > g.max_batch or max(counts) > q:
            return None
        drafts = out.drafts
        for r, s, c in zip(reqs, starts, counts, strict=True):
            d = len(drafts.get(r.request_id, ()))
            if s + c != len(r.all_token_ids) + d or c != 1 + d:
                return None  # a prefill chunk in the step: run it eagerly
        bs = self.kv_cache.spec.block_size
        st = np.asarray(starts, dtype=np.int64)
        cnt = np.asarray(counts, dtype=np.int64)
        table = self._tables.build(out.block_ids, out.table_edits, copy=False)  # staged by run()
        pos = st[:, None] + np.arange(q)[None, :]
        real = np.arange(q)[None, :] < cnt[:, None]
        col = np.minimum(pos // bs, table.shape[1] - 1)
        slots = np.where(
            real, table[np.arange(n)[:, None], col].astype(np.int64) * bs + pos % bs, -1
        )
        ids = np.zeros((n, q), dtype=np.int64)
        rows = []  # the rows that verify drafts
        for i, r in enumerate(reqs):
            ids[i, 0] = r.all_token_ids[starts[i]]
            d = drafts.get(r.request_id)
            if d:
                ids[i, 1 : 1 + len(d)] = d
                rows.append(i)
        if self.mirror is not None:
            self.mirror.verify(ids.ravel(), pos.ravel(), slots.ravel(), st + q, table)
        logits = g.run(ids.ravel(), pos.ravel(), slots.ravel(), st + q, table)
        flat = np.concatenate([i * q + np.arange(counts[i]) for i in rows])
        self._verify_rows(logits[torch.from_numpy(flat).to(logits.device)], out, rows, results)
        verified = set(rows)
        others = [i for i in range(n) if i not in verified]
        if not others:
            return logits[:0], others
        first = torch.tensor([i * q for i in others], device=logits.device)
        return logits[first], others

    def _verify_rows(self, logits: torch.Tensor, out: SchedulerOutput, rows: list[int], results):
        """Verify the drafts of schedule ``rows`` from ``logits`` (``[sum(1 + d_i), V]``, each
        row's positions in order); their tokens and failures go into ``results``."""
        reqs = [out.requests[i] for i in rows]
        failed: dict[int, str] = {}
        drafts = [out.drafts[r.request_id] for r in reqs]
        tokens = self.spec_verifier.verify(logits, reqs, drafts, failed)
        for i, toks in zip(rows, tokens, strict=True):
            results[i].extend(toks)
        for j, detail in failed.items():  # degenerate logits: only that request fails
            results.failed[rows[j]] = detail

    def _verify(self, out: SchedulerOutput, batch, hidden: torch.Tensor, results) -> list[int]:
        """Verify the drafts of every row that carries some (logits at all its ``1 + d``
        positions); fills those rows' tokens and returns the other sampling rows."""
        reqs, drafts = out.requests, out.drafts
        rows = [i for i, r in enumerate(reqs) if r.request_id in drafts]
        qsl = batch.meta.query_start_loc_cpu
        idx = np.concatenate([np.arange(qsl[i], qsl[i + 1]) for i in rows])
        logits = self.compute_logits(hidden[torch.from_numpy(idx).to(hidden.device)])
        self._verify_rows(logits, out, rows, results)
        verified = set(rows)
        return [i for i in batch.sample_rows if i not in verified]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepTokens:
        """Run the step; returns the sampled token ids of each row (empty when a row does not
        sample, a prefill chunk short of the prompt's end, or when its sampling failed), with
        the failures, logprobs and prompt logprobs of the step attached (``StepTokens``)."""
        tm = self.timings
        t0 = time.perf_counter()
        self.copy_blocks(out.blocks_to_copy)
        results = StepTokens([] for _ in out.requests)
        logits = got = None
        sample_bucket = None  # set when the step's sampling can replay a sampler graph
        speculating = self.spec_verifier is not None and bool(out.drafts)
        if speculating and self.verify_graphs is not None:
            got = self._graph_verify(out, results)
        elif self.graphs is not None:
            logits = self._graph_logits(out)
            if logits is not None:
                got = (logits, list(range(len(out.requests))))
                if self.sampler_graphs is not None:
                    sample_bucket = self.graphs.bucket_for(len(out.requests))
        if got is not None:  # the step ran through a captured graph
            logits, sample_rows = got
            t1 = time.perf_counter()
        else:
            batch = prepare_batch(out, self.kv_cache.spec.block_size, self.device, self._tables)
            sample_rows = batch.sample_rows
            self._sync()
            t1 = time.perf_counter()
            if self.mirror is not None:
                self.mirror.forward(batch.host)
            hidden = self.forward_batch(batch)
            if speculating:
                sample_rows = self._verify(out, batch, hidden, results)
            if sample_rows:
                index = batch.sample_indices
                if len(sample_rows) != len(batch.sample_rows):  # verification rows left out
                    keep = set(sample_rows)
                    pos = [j for j, row in enumerate(batch.sample_rows) if row in keep]
                    index = index[torch.tensor(pos, device=index.device)]
                logits = self.compute_logits(hidden[index])
            if any_prompt_logprobs(out.requests):
                qsl = batch.meta.query_start_loc_cpu
                results.prompt_logprobs = prompt_logprobs(self, hidden, out, qsl)
        if sample_rows:
            self._sync()
            t2 = time.perf_counter()
            reqs = [out.requests[i] for i in sample_rows]
            epoch = self.sampler.kernel_epoch
            if sample_bucket is not None:
                res = self.sampler_graphs.sample(reqs, sample_bucket)
            else:
                res = self.sampler.sample(logits, self.sampler.prepare(reqs)).to_host()
            res = self.sampler.redraw(logits, res, reqs)  # a plug-in's out-of-vocabulary ids
            if self.sampler.kernel_epoch != epoch:
                self._drop_sampler_graphs()
            for row, tok, lp in zip(sample_rows, res.tokens, res.logprobs, strict=True):
                results[row].append(tok)
                if lp is not None:
                    results.logprobs[row] = lp
            for k, detail in res.failed.items():
                results[sample_rows[k]].clear()
                results.failed[sample_rows[k]] = detail
        else:
            self._sync()
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        tm.prepare += t1 - t0
        tm.forward += t2 - t1
        tm.sample += t3 - t2
        if got is None and results.failed and self._blame_non_finite(batch, hidden, results.failed):
            return self.execute(out)  # the step again, with the kernels that replaced it
        return results
