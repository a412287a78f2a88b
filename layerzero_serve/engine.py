"""Engine: the scheduler, the KV cache and the model runner behind ``add_request / step /
abort``. One step = schedule -> prepare -> forward -> sample -> update."""

from __future__ import annotations

import atexit
import gc
import itertools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from layerzero_serve._async_scheduling import AsyncScheduling
from layerzero_serve._model_source import LoadedModel, load_model_source
from layerzero_serve.config import EngineConfig, engine_config_of, kv_budget_bytes
from layerzero_serve.errors import RequestRejectedError, ValidationError, check_int
from layerzero_serve.kernels.spec import Op
from layerzero_serve.kv_cache import KVCache, KVCacheManager, KVCacheSpec
from layerzero_serve.runner._cpu_threads import choose_cpu_threads
from layerzero_serve.runner._memory import measure_graph_memory
from layerzero_serve.runner._model_runner import ModelRunner, optimize_model
from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.sampling._prompt_logprobs import StepTokens
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.selection._device import probe_device
from layerzero_serve.selection.plans import ModelShape, base_context, batch_buckets
from layerzero_serve.spec_decode._coordinator import SpecCoordinator
from layerzero_serve.types import (
    Request,
    RequestOutput,
    RequestStatus,
    SchedulerOutput,
    TokenLogprob,
)

logger = logging.getLogger("layerzero_serve")
# Verification graphs hold logits for every token of a bucket (batch x (k + 1) x vocab): capture
# them for buckets up to this size; larger verification steps run eagerly.
MAX_VERIFY_GRAPH_BATCH = 64
PRIORITY_BOUND = (1 << 31) - 1  # request priorities are ints in [-PRIORITY_BOUND, PRIORITY_BOUND]
_UNFREEZE_AT_EXIT: list[bool] = []


def _kv_pool(cfg, loaded: LoadedModel, spec: KVCacheSpec, shape, graph_bucket: int) -> KVCache:
    """The KV tensors: ``num_kv_blocks`` if given, else the memory budget minus what the CUDA
    graphs of the largest bucket (``graph_bucket``; 0 = no graphs) were measured to take."""
    device = loaded.resolved.device
    if cfg.num_kv_blocks is not None:
        kv_cache = KVCache(spec, num_blocks=cfg.num_kv_blocks, device=device)
    else:
        budget = kv_budget_bytes(cfg, device)
        if graph_bucket:  # graph memory is measured first and kept out of the KV budget
            max_len = loaded.resolved.max_model_len
            budget -= measure_graph_memory(
                loaded.model, spec, shape, graph_bucket, max_len, device, cfg.max_num_seqs
            )
        kv_cache = KVCache(spec, budget_bytes=budget, device=device)
    logger.info(
        "KV pool: %d blocks of %d tokens, %.2f GiB",
        kv_cache.num_blocks,
        cfg.block_size,
        kv_cache.nbytes / 2**30,
    )
    return kv_cache


def _scheduler_config(cfg: EngineConfig, max_model_len: int, speculating: bool):
    return SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=cfg.enable_chunked_prefill,
        max_prefill_chunk=cfg.max_prefill_chunk,
        policy=cfg.policy,
        # drafts need KV slots past the last token: reserve them with every allocation
        num_lookahead_tokens=cfg.num_speculative_tokens if speculating else 0,
    )


def _freeze_startup_objects() -> None:
    """Start-up objects (weights' Python wrappers, the block pool) never die: keep the cyclic
    collector off them so its passes stay short on the hot path."""
    gc.collect()
    gc.freeze()
    if not _UNFREEZE_AT_EXIT:  # let interpreter shutdown free them normally (once)
        atexit.register(gc.unfreeze)
        _UNFREEZE_AT_EXIT.append(True)


class Engine:
    """A complete serving loop over one model.

    ``Engine("dummy:tiny", max_num_seqs=8)``, ``Engine(model="dummy:tiny", ...)`` or
    ``Engine(EngineConfig(...))``: a str or path given positionally is the model, as in
    ``LLM("...")``; keyword overrides are EngineConfig fields (an unknown name raises a
    ValidationError naming it).
    Requests are token ids; ``step()`` returns streaming outputs (new token ids and, at the
    end, a finish reason). With ``SamplingParams.n > 1`` a request runs as ``n`` sequences
    ``"{id}#{k}"`` that share the prompt's cached blocks.

    CUDA graphs: a host loop that replays the runner's captured graphs; never call it inside a
    capture.
    """

    def __init__(
        self, config: EngineConfig | str | os.PathLike | None = None, **overrides: object
    ) -> None:
        self.config = cfg = engine_config_of(config, overrides)
        loaded: LoadedModel = load_model_source(cfg)
        self.model_config = mc = loaded.config
        self.model_dir: Path | None = loaded.path
        self.resolved = loaded.resolved
        device, dtype = loaded.resolved.device, loaded.resolved.dtype
        if device.type == "cpu":
            choose_cpu_threads(mc.hidden_size, cfg.cpu_threads)
        spec = KVCacheSpec(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.block_size, dtype)
        shape = ModelShape(
            str(dtype).removeprefix("torch."),
            mc.head_dim,
            mc.num_heads,
            mc.num_kv_heads,
            mc.vocab_size,
        )
        use_graphs = device.type == "cuda" and not cfg.enforce_eager
        if device.type == "cuda":
            optimize_model(loaded.model, shape, device, cfg.block_size, cfg.max_num_seqs)
        buckets = batch_buckets(cfg.max_graph_batch or min(cfg.max_num_seqs, 256))
        max_len = loaded.resolved.max_model_len
        kv_cache = _kv_pool(cfg, loaded, spec, shape, buckets[-1] if use_graphs else 0)
        self.kv_manager = KVCacheManager(
            kv_cache.num_blocks, cfg.block_size, cfg.enable_prefix_caching, cfg.prefix_hash
        )
        speculating = cfg.speculative_method is not None
        self.scheduler = Scheduler(_scheduler_config(cfg, max_len, speculating), self.kv_manager)
        self.runner = ModelRunner(
            loaded.model,
            shape,
            kv_cache,
            Sampler(seed=cfg.seed, max_num_seqs=cfg.max_num_seqs),
            device,
            cfg.max_num_seqs,
        )
        # verification graphs (and a draft model's decode graphs) stop at a smaller batch
        small = [b for b in buckets if b <= MAX_VERIFY_GRAPH_BATCH] or buckets[:1]
        self.spec = (
            self._speculation(cfg, loaded, shape, kv_cache, small if use_graphs else None)
            if speculating
            else None
        )
        self._setup_graphs(buckets, small, min(max_len, self.scheduler.max_seq_len), use_graphs)
        eos_ids = list(mc.eos_token_ids)
        self.eos_token_id: int | None = eos_ids[0] if eos_ids else None
        self._extra_stop_ids = frozenset(eos_ids[1:])
        self._eos_ids = tuple(eos_ids)
        self._ids = itertools.count()
        self._children: dict[str, list[str]] = {}
        # prompt logprobs collected over prefill chunks, until the first output token
        self._prompt_lp: dict[str, list[TokenLogprob | None]] = {}
        self.num_generated_tokens = 0
        _freeze_startup_objects()

    def _setup_graphs(
        self, buckets: list[int], small: list[int], graph_len: int, use_graphs: bool
    ) -> None:
        """Decode buckets (graphs on or off: the same split-KV rule), then on CUDA the decode
        graphs, the verification graphs (k + 1 tokens per row, ``small`` buckets) and async
        scheduling (decode steps through the graphs without drafts)."""
        self.runner.set_decode_buckets(buckets, graph_len)
        self._async = None
        if not use_graphs:
            return
        cfg = self.config
        self.runner.enable_graphs(buckets, graph_len)
        if self.spec is not None:
            self.runner.enable_verify_graphs(small, graph_len, cfg.num_speculative_tokens + 1)
        if cfg.async_scheduling:
            self._async = AsyncScheduling(self.runner, self.scheduler)

    def _speculation(
        self, cfg, loaded: LoadedModel, shape, kv_cache, graph_buckets
    ) -> SpecCoordinator:
        """Proposer, verifier (its kernel selected once for the plan), metrics and adaptive k;
        the runner verifies through it. ``graph_buckets``: a draft model's CUDA-graph buckets
        (None: eager)."""
        ctx = base_context(
            Op.REJECTION_SAMPLING,
            probe_device(loaded.resolved.device),
            shape,
            cfg.block_size,
            cfg.max_num_seqs,
            cfg.num_speculative_tokens + 1,
            False,
        )
        spec = SpecCoordinator.from_config(
            cfg,
            self.runner.selector,
            ctx,
            loaded.resolved,
            kv_cache.num_blocks,
            seeds_of=self.runner.sampler.seeds_of,
            graph_buckets=graph_buckets,
        )
        self.runner.spec_verifier = spec.verifier
        return spec

    # ---- requests ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.scheduler.config.max_model_len

    def _validate_params(self, params: SamplingParams) -> None:
        """``params`` against this model: ids in the vocabulary, and (with ``min_tokens``)
        some token left to sample besides the stop and EOS ids."""
        if not isinstance(params, SamplingParams):
            raise ValidationError("params", type(params).__name__, "a SamplingParams")
        params.validate_for_vocab(self.vocab_size, eos_token_ids=list(self._eos_ids) or None)

    def _validate_prompt(self, prompt_token_ids: Sequence[int]) -> list[int]:
        if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Sequence):
            raise ValidationError(
                "prompt_token_ids",
                type(prompt_token_ids).__name__,
                "a sequence of token ids (tokenize strings first, or use LLM)",
            )
        ids = list(prompt_token_ids)
        if not ids:
            raise ValidationError("prompt_token_ids", ids, "at least one token")
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValidationError(f"prompt_token_ids[{i}]", t, f"an int in [0, {vocab})")
        limit = self.scheduler.max_seq_len
        if len(ids) + 1 > limit:
            which = "max_model_len" if limit == self.max_model_len else "KV pool capacity"
            raise RequestRejectedError(
                "prompt_token_ids",
                f"{len(ids)} tokens",
                f"at most {limit - 1} tokens ({which} {limit} minus one)",
            )
        return ids

    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request; returns its id (``request_id``, or a generated one that no live
        request uses). With ``params.n > 1`` the samples run as ``{id}#0`` .. ``{id}#{n-1}``;
        ``id`` is free again once all have ended. Raises a ValidationError (a ValueError), before
        anything is queued, for an empty prompt, an id outside the vocabulary, a prompt that can
        never fit, bad params, a ``request_id`` that is not a str or is in use, a ``priority``
        outside ``[-(2**31 - 1), 2**31 - 1]`` (lower runs first under the priority policy), or
        a ``cache_salt`` that is not a str."""
        params = params if params is not None else SamplingParams()
        self._validate_params(params)
        ids = self._validate_prompt(prompt_token_ids)
        if request_id is not None and not isinstance(request_id, str):
            raise ValidationError("request_id", request_id, "None or a str")
        priority = check_int("priority", priority, -PRIORITY_BOUND, PRIORITY_BOUND)
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValidationError("cache_salt", cache_salt, "None or a str")
        rid = request_id
        while rid is None:  # a generated id never collides with one the caller chose
            rid = str(next(self._ids))
            rid = rid if self._id_free(rid, params.n) else None
        names = [rid] if params.n == 1 else [f"{rid}#{k}" for k in range(params.n)]
        if not self._id_free(rid, params.n):  # checked for every sample before queueing any
            raise ValidationError("request_id", rid, "an id not already in use")
        if params.n > 1:
            self._children[rid] = names
        for k, name in enumerate(names):
            salt = cache_salt
            if params.prompt_logprobs is not None:
                # every prompt position must be computed (no prefix-cache hits), so this
                # sequence gets a prefix cache of its own
                salt = f"{cache_salt or ''}\x00prompt-logprobs:{name}"
            req = Request(
                request_id=name,
                prompt_token_ids=ids,
                max_tokens=params.max_tokens,
                eos_token_id=self.eos_token_id,
                # ignore_eos covers every EOS id of the model (its generation config may list
                # several), as in HF/vLLM; explicit stop_token_ids still stop.
                stop_token_ids=frozenset(params.stop_token_ids)
                | (frozenset() if params.ignore_eos else self._extra_stop_ids),
                ignore_eos=params.ignore_eos,
                priority=priority,
                cache_salt=salt,
                sampling_params=params,
            )
            if params.seed is not None and params.n > 1:  # siblings draw distinct streams
                req.seed = (params.seed + k * 0x9E3779B97F4A7C15) % (1 << 63)
            if params.prompt_logprobs is not None:
                self._prompt_lp[name] = [None] * len(ids)
            self.scheduler.add_request(req)
            if self._async is not None:
                self._async.add(req)
        return rid

    def _forget_parent(self, name: str) -> None:
        """Once every sample ``rid#k`` of an n > 1 request has ended, ``rid`` is free again."""
        parent = name.rpartition("#")[0]
        names = self._children.get(parent) if parent else None
        if names and name in names and not any(n in self.scheduler.requests for n in names):
            del self._children[parent]

    def _id_free(self, rid: str, n: int) -> bool:
        """Neither ``rid`` nor (for n > 1) any of its sample ids ``rid#k`` is in use."""
        live = self.scheduler.requests
        if rid in live or rid in self._children:
            return False
        return n == 1 or not any(f"{rid}#{k}" in live for k in range(n))

    def abort(self, request_id: str) -> bool:
        """Abort a request (all its samples when n > 1). Unknown or finished: no-op, False."""
        if not isinstance(request_id, str):
            raise ValidationError("request_id", request_id, "a str")
        names = self._children.pop(request_id, [request_id])
        done = [self.scheduler.abort(n) for n in names]
        if self._async is not None:
            for n in names:
                self._async.release(n)
        return any(done)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of every request that got tokens or ended."""
        if self._async is not None and self._async.ahead is not None:
            if not self._async.take_stale():
                return self._step_ahead()
            if self.spec is not None:
                self.spec.drop_shadow()  # its shadow drafts go with it
        tm = self.runner.timings
        t0 = time.perf_counter()
        spec = self.spec
        t_draft = 0.0
        if spec is not None:  # drafting is part of a speculative step's cost
            running = self.scheduler.running.items
            spec.propose(running, len(self.scheduler.running), defer_shadow=self._async is not None)
            t_draft = time.perf_counter() - t0
        # speculation off this step (adaptive k = 0): no lookahead slots to reserve
        out = (
            self.scheduler.schedule() if spec is None or spec.last_k else self.scheduler.schedule(0)
        )
        t1 = time.perf_counter()
        pending = None
        if self._async is not None and (spec is None or not spec.last_k):
            pending = self._async.launch(out, bool(self._prompt_lp))
        if spec is not None and spec.shadow_due:  # deferred: drafted while the step runs
            spec.propose_shadow(self.scheduler.running.items)
        if pending is not None:
            self._async.launch_next(pending, spec)  # step N+1 on the device before N's tokens
            tokens = self._async.collect(pending)
        else:
            tokens = self.runner.execute(out) if out.requests else StepTokens()
        t2 = time.perf_counter()
        self._fail_rows(out, tokens)
        if spec is not None:
            self._record_speculation(out, tokens, t2 - t1 + t_draft)
        tm.schedule += t1 - t0
        return self._apply(out, tokens, t2)

    def _step_ahead(self) -> list[RequestOutput]:
        """Async scheduling: the step launched by the previous call; the one after it is
        launched (when it continues plainly) before this one's tokens are read."""
        out, pending = self._async.ahead
        self._async.ahead = None
        t0 = time.perf_counter()
        self._async.launch_next(pending, self.spec)
        t1 = time.perf_counter()
        tokens = self._async.collect(pending)
        self.runner.timings.schedule += t1 - t0
        t2 = time.perf_counter()
        self._fail_rows(out, tokens)
        if self.spec is not None:  # shadow probes only: a launched-ahead step has no own time
            self._record_speculation(out, tokens, None)
        return self._apply(out, tokens, t2)

    def _fail_rows(self, out: SchedulerOutput, tokens: StepTokens) -> None:
        for row, detail in tokens.failed.items():  # only that request fails; others go on
            req = out.requests[row]
            # (a launched-ahead row of a request that has ended meanwhile: its id may be reused)
            if req.status is RequestStatus.RUNNING:
                self.scheduler.fail(req.request_id, detail)

    def _apply(self, out: SchedulerOutput, tokens: StepTokens, t2: float) -> list[RequestOutput]:
        """Apply a step's tokens to its requests: failures, update, per-request bookkeeping."""
        tm = self.runner.timings
        # the runner's rows are ints from a device tensor: only their count is checked
        outputs = list(self.scheduler.update(out, tokens, check_rows=False))
        tm.update += time.perf_counter() - t2
        tm.steps += 1
        if tokens.logprobs or tokens.prompt_logprobs or self._prompt_lp:
            self._attach_logprobs(out, tokens, outputs)
        spec = self.spec
        for o in outputs:
            self.num_generated_tokens += len(o.new_token_ids)
            if o.finished:
                self.runner.sampler.release(o.request_id)
                if spec is not None:
                    spec.release(o.request_id)
                if self._async is not None:
                    self._async.release(o.request_id)
                self._prompt_lp.pop(o.request_id, None)
                self._forget_parent(o.request_id)
        if spec is not None and spec.shadow_due:  # for the step already on the device
            spec.propose_shadow(self.scheduler.running.items)
        return outputs

    def _record_speculation(self, out, tokens: StepTokens, seconds: float | None) -> None:
        """Drafts and accepted drafts of this step's verification rows (before ``update``
        clears the drafts), and the step's time (``seconds``; None: unknown) when it was a pure
        decode step."""
        spec = self.spec
        spec.score_shadow(out.requests, tokens)
        if not spec.last_k:  # no drafts this step: only its time, when it was pure decode
            if seconds is not None and out.num_batched_tokens == len(out.requests):
                spec.observe_step(len(out.requests), seconds, False)
            return
        total = sum(len(r.spec_token_ids) for r in out.requests)
        if out.num_batched_tokens == len(out.requests) + total:  # no prefill in the step
            spec.observe_step(len(out.requests), seconds, total > 0)
        drafts, accepted, ids = [], [], []
        for row, req in enumerate(out.requests):
            d = len(req.spec_token_ids)
            if d and tokens[row]:
                drafts.append(d)
                accepted.append(len(tokens[row]) - 1)
                ids.append(req.request_id)
        spec.record(drafts, accepted, ids)

    def _attach_logprobs(self, out, tokens: StepTokens, outputs: list[RequestOutput]) -> None:
        """Per-token logprobs onto this step's outputs; prompt logprobs collected per position
        over the prefill chunks and attached once, with the request's first output token."""
        reqs = out.requests
        for row, entries in tokens.prompt_logprobs.items():
            slots = self._prompt_lp.get(reqs[row].request_id)
            if slots is not None:
                for pos, lp in entries:
                    slots[pos] = lp
        token_lp = {reqs[row].request_id: lp for row, lp in tokens.logprobs.items()}
        for o in outputs:
            if not o.new_token_ids:
                continue
            lp = token_lp.get(o.request_id)
            if lp is not None:
                o.logprobs = [lp]
            pending = self._prompt_lp.pop(o.request_id, None)
            if pending is not None:
                o.prompt_logprobs = pending

    # ---- reporting ---------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        """Counters for reports: prefix-cache hit rate, preemptions, kernels, timings, and the
        KV pool's blocks (``kv_cache``: ``num_blocks`` usable blocks = ``free`` (never used or
        evicted) + ``cached`` (free but still in the prefix cache, evictable) + ``used`` (held
        by requests); ``used`` is 0 once every request has ended).

        CUDA graphs: host only."""
        kv = self.kv_manager
        return {
            "prefix_cache_hit_rate": kv.stats.hit_rate,
            "prefix_cache_hit_tokens": kv.stats.hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_generated_tokens": self.num_generated_tokens,
            "kernels": {
                "attention_decode": self.runner.attn.decode.choice.name,
                "attention_prefill": self.runner.attn.prefill.choice.name,
                "sampling": self.runner.sampler.kernel_name,
            },
            "kv_blocks": kv.num_blocks,
            "kv_cache": kv.block_usage(),
            "timings_s": self.runner.timings.as_dict(),
            "steps": self.runner.timings.steps,
            # steps launched before the previous step's tokens were read (async scheduling)
            "async_steps_ahead": 0 if self._async is None else self._async.steps_ahead,
            "speculative": None if self.spec is None else self.spec.stats(),
        }
