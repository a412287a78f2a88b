"""Draft-model proposer: a smaller checkpoint sharing the target's vocabulary proposes ``k``
greedy tokens per request, with its own paged KV cache and its own kernels (selected once per
plan, like the target's).

Per request the proposer keeps a mirror ``Request`` in its own KV cache manager. Each
``propose`` first re-syncs the mirror with the target's tokens: positions past the longest
common prefix (drafts the target rejected) are given back without copying
(``num_computed_tokens`` moves back, emptied blocks are freed); then it runs ``k`` greedy steps
over all requests at once (the first one also computes the tokens the target accepted since the
last call). Drafts are greedy, so the draft distribution ``q`` is one-hot and the verifier's
rejection sampling stays lossless for sampled requests too.

On CUDA (``graph_buckets`` given) the draft's decode steps replay CUDA graphs captured per
batch bucket, like the target's, with its sampler's greedy argmax replayed from a graph too;
the first step of each call (it computes the tokens accepted since the last call, several per
request) and batches above the largest bucket run eagerly.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from layerzero_serve._model_source import load_model_source
from layerzero_serve.config import EngineConfig
from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import KVCache, KVCacheManager
from layerzero_serve.runner import ModelRunner, prepare_model
from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.spec_decode._proposer import MAX_K, Proposer, check_int
from layerzero_serve.types import Request, SchedulerOutput

logger = logging.getLogger("layerzero_serve")


class DraftModelProposer(Proposer):
    """Greedy drafts from a second model.

    Args:
        model: checkpoint directory or dummy preset of the draft model.
        target_vocab_size: the target's vocabulary size; a draft with another size is rejected
            (its token ids would mean different tokens).
        device, dtype: as ``EngineConfig`` (use the target's resolved values).
        block_size, num_kv_blocks: the draft's own paged KV cache.
        max_num_seqs, max_model_len: batch and length limits (the target's).
        graph_buckets: batch sizes whose decode step is captured as a CUDA graph (CUDA only;
            None or empty: eager).

    CUDA graphs: ``propose`` runs on the host between target steps; with ``graph_buckets`` the
    draft's own decode steps replay its own captured graphs there, never inside the target's
    capture.
    """

    name = "draft_model"
    needs_model = True

    def __init__(
        self,
        model: str,
        target_vocab_size: int,
        *,
        device: str = "auto",
        dtype: str = "auto",
        block_size: int = 16,
        num_kv_blocks: int = 1024,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        graph_buckets: Sequence[int] | None = None,
    ) -> None:
        cfg = EngineConfig(
            model=str(model),
            device=device,
            dtype=dtype,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
        )
        loaded = load_model_source(cfg)
        mc = loaded.config
        if mc.vocab_size != target_vocab_size:
            raise ValidationError(
                "speculative_model",
                str(model),
                f"a model with the target's vocabulary of {target_vocab_size} tokens "
                f"(this one has {mc.vocab_size}: its ids would mean other tokens)",
            )
        dev = loaded.resolved.device
        shape, spec = prepare_model(loaded, block_size, max_num_seqs)  # as the engine does
        self.kv_cache = KVCache(spec, num_blocks=num_kv_blocks, device=dev)
        self.kv = KVCacheManager(num_kv_blocks, block_size, enable_prefix_caching=False)
        sampler = Sampler(seed=0, max_num_seqs=max_num_seqs)
        self.runner = ModelRunner(loaded.model, shape, self.kv_cache, sampler, dev, max_num_seqs)
        self.max_len = loaded.resolved.max_model_len
        if graph_buckets and dev.type == "cuda":
            buckets = sorted(
                {check_int("graph_buckets", b, 1, max_num_seqs) for b in graph_buckets}
            )
            self.runner.set_decode_buckets(buckets, self.max_len)
            try:
                self.runner.enable_graphs(buckets, self.max_len, progress=False)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # drafts stay exact
                logger.warning("draft model: CUDA-graph capture failed (%s); running eagerly", e)
                self.runner.disable_graphs()
        self.vocab_size = mc.vocab_size
        self._greedy = SamplingParams(temperature=0.0, max_tokens=self.max_len)
        self._mirrors: dict[str, Request] = {}
        self._synced: dict[str, int] = {}  # target length at each request's last sync
        self._steps = itertools.count()
        self._anon = itertools.count()

    # ---- Proposer ----------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(
        self,
        requests_tokens: Sequence[Sequence[int]],
        k: int,
        request_ids: Sequence[str] | None = None,
    ) -> list[list[int]]:
        """Up to ``k`` greedy draft ids per request (fewer near ``max_model_len`` or when the
        draft's KV pool is full). ``request_ids`` keeps each request's draft KV between calls;
        without them every call starts from scratch."""
        k = check_int("k", k, 0, MAX_K)
        temporary = request_ids is None
        if temporary:
            request_ids = [f"~draft{next(self._anon)}" for _ in requests_tokens]
        elif len(request_ids) != len(requests_tokens):
            raise ValidationError(
                "request_ids", len(request_ids), f"{len(requests_tokens)} ids (one per request)"
            )
        mirrors = [
            self._sync(rid, tokens)
            for rid, tokens in zip(request_ids, requests_tokens, strict=True)
        ]
        lengths = [len(m.all_token_ids) for m in mirrors]
        active = [m for m in mirrors if len(m.all_token_ids) < self.max_len - 1]
        for _ in range(k):
            active = self._step(active)
            if not active:
                break
        drafts = [m.all_token_ids[n:] for m, n in zip(mirrors, lengths, strict=True)]
        if temporary:
            for rid in request_ids:
                self.release(rid)
        return drafts

    def release(self, request_id: str) -> None:
        mirror = self._mirrors.pop(request_id, None)
        self._synced.pop(request_id, None)
        if mirror is not None:
            self.kv.free(mirror)
            self.runner.sampler.release(request_id)

    # ---- internals ---------------------------------------------------------------------------
    def _sync(self, rid: str, tokens: Sequence[int]) -> Request:
        """The mirror of ``rid`` holding exactly ``tokens``, its KV kept for their longest
        common prefix with what it computed before (at least the last token is recomputed:
        its logits give the first draft)."""
        toks = [int(t) for t in tokens]
        m = self._mirrors.get(rid)
        if m is None:
            m = Request(rid, toks, max_tokens=self.max_len, sampling_params=self._greedy)
            self._mirrors[rid] = m
            self._synced[rid] = len(toks)
            return m
        # A target's tokens only grow: the first ``synced`` ones (its tokens at the last call)
        # are common, only the window after them (drafts vs accepted tokens) is compared.
        old, synced = m.all_token_ids, self._synced[rid]
        n = min(len(old), len(toks))
        same = np.asarray(old[synced:n]) == np.asarray(toks[synced:n])
        common = n if same.all() else synced + int(np.argmin(same))
        self._synced[rid] = len(toks)
        keep = min(m.num_computed_tokens, common, len(toks) - 1)
        if keep < m.num_computed_tokens:
            m.num_computed_tokens = keep
            self.kv.trim(m, keep)
        m.all_token_ids = toks
        return m

    def _step(self, mirrors: list[Request]) -> list[Request]:
        """One greedy step over ``mirrors``: computes each one's pending tokens and appends the
        next token. Returns the mirrors that can go on (room left in the cache and length)."""
        rows, starts, counts, tables = [], [], [], []
        for m in mirrors:
            start = m.num_computed_tokens
            n = len(m.all_token_ids) - start
            ids = self.kv.allocate_slots(m, n, None, 0)
            if ids is None:  # draft pool full: this request gets the drafts it has so far
                continue
            rows.append(m)
            starts.append(start)
            counts.append(n)
            tables.append(ids)
        if not rows:
            return []
        changes = self.kv.end_step()
        out = SchedulerOutput(
            next(self._steps),
            rows,
            starts,
            counts,
            tables,
            sum(counts),
            changes.copies,
            [],
            changes.table_edits,
        )
        tokens = self.runner.execute(out)
        going = []
        for m, start, n, toks in zip(rows, starts, counts, tokens, strict=True):
            m.num_computed_tokens = start + n
            if not toks:  # the draft's own logits failed (NaN): stop drafting this request
                continue
            m.all_token_ids.append(int(toks[0]))
            if len(m.all_token_ids) < self.max_len - 1:
                going.append(m)
        return going
