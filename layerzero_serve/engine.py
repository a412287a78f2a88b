"""Engine: the scheduler, the KV cache and the model runner behind ``add_request / step /
abort``. One step = schedule -> prepare -> forward -> sample -> update."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from layerzero_serve._async_scheduling import AsyncScheduling
from layerzero_serve._engine_setup import (
    GraphSetup,
    build_model_side,
    capture_graphs,
    freeze_startup_objects,
    scheduler_config,
    sibling_seed,
)
from layerzero_serve._generation_defaults import default_sampling_params, generation_eos_ids
from layerzero_serve._model_source import LoadedModel
from layerzero_serve._output_processor import OutputProcessor
from layerzero_serve._prompts import parse_prompt
from layerzero_serve._step_execution import SyncExecution
from layerzero_serve._tensor_parallel import start_tensor_parallel
from layerzero_serve.config import EngineConfig, engine_config_of
from layerzero_serve.distributed.step_mirror import TensorParallelWorkerError
from layerzero_serve.distributed.workers import check_same_plans, run_worker
from layerzero_serve.errors import RequestRejectedError, ValidationError, check_int
from layerzero_serve.kernels.spec import Op
from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.runner import ModelRunner
from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.scheduler import Scheduler
from layerzero_serve.selection import probe_device
from layerzero_serve.selection.plans import base_context
from layerzero_serve.spec_decode import SpecCoordinator
from layerzero_serve.spec_decode.step_hooks import NoSpeculation, SpeculationHooks
from layerzero_serve.tokenizer import Tokenizer
from layerzero_serve.types import (
    Request,
    RequestOutput,
    RequestStatus,
    SchedulerOutput,
    StepTokens,
    TokenLogprob,
)

logger = logging.getLogger("layerzero_serve")
# Verification graphs hold logits for every token of a bucket (batch x (k + 1) x vocab): capture
# them for buckets up to this size; larger verification steps run eagerly.
MAX_VERIFY_GRAPH_BATCH = 64
PRIORITY_BOUND = (1 << 31) - 1  # request priorities are ints in [-PRIORITY_BOUND, PRIORITY_BOUND]


class Engine:
    """A complete serving loop over one model.

    ``Engine("dummy:tiny", max_num_seqs=8)``, ``Engine(model="dummy:tiny", ...)`` or
    ``Engine(EngineConfig(...))``: a str or path given positionally is the model, as in
    ``LLM("...")``; keyword overrides are EngineConfig fields (an unknown name raises a
    ValidationError naming it).
    Prompts are token ids or, with a tokenizer, text; ``step()`` returns streaming outputs
    (new token ids, their text delta, and at the end a finish reason). With
    ``SamplingParams.n > 1`` a request runs as ``n`` sequences ``"{id}#{k}"`` that share the
    prompt's cached blocks. ``tokenizer``: the checkpoint's (a ``Tokenizer``), or None.

    CUDA graphs: a host loop that replays the runner's captured graphs; never call it inside a
    capture.
    """

    def __init__(
        self, config: EngineConfig | str | os.PathLike | None = None, **overrides: object
    ) -> None:
        self.config = cfg = engine_config_of(config, overrides)
        # tensor parallelism: the process groups and workers (None at one rank)
        self._tp = start_tensor_parallel(cfg)
        self.is_driver = self._tp is None or self._tp.group.is_driver
        # why requests and steps are refused (None: they are not): a closed engine, or a
        # torchrun rank > 0, which serves rank 0's steps inside this constructor
        self._refusal: RuntimeError | None = None
        if not self.is_driver:
            self._refusal = RuntimeError(
                f"this process is tensor-parallel rank {self._tp.group.rank}: only rank 0 "
                "takes requests and steps (its Engine returned once rank 0 closed)"
            )
            try:
                run_worker(cfg, self._tp.group)
            finally:
                self._tp.close()
            return
        try:
            self._build(cfg)
        except BaseException:
            if self._tp is not None:
                self._tp.mirror.fail(RuntimeError("engine start-up failed"))
            raise

    def close(self) -> None:
        """End the tensor-parallel workers and free the process groups; afterwards requests
        and steps raise. Idempotent; also run by ``with Engine(...)``, when the engine is
        collected and at interpreter exit."""
        if self._refusal is None:
            self._refusal = RuntimeError("this Engine is closed")
        if self._tp is not None:
            self._tp.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        tp = getattr(self, "_tp", None)
        if tp is not None:
            tp.close()

    def _build(self, cfg: EngineConfig) -> None:
        tp = self._tp
        side = build_model_side(cfg, None if tp is None else tp.group)
        loaded, shape, kv_cache, selector = side.loaded, side.shape, side.kv_cache, side.selector
        buckets, use_graphs = side.buckets, side.use_graphs
        self.model_config = mc = loaded.config
        self.model_dir: Path | None = loaded.path
        self.resolved = loaded.resolved
        device = loaded.resolved.device
        max_len = loaded.resolved.max_model_len
        self.kv_manager = KVCacheManager(
            kv_cache.num_blocks, cfg.block_size, cfg.enable_prefix_caching, cfg.prefix_hash
        )
        speculating = cfg.speculative_method is not None
        self.scheduler = Scheduler(scheduler_config(cfg, max_len, speculating), self.kv_manager)
        sampler = Sampler(seed=cfg.seed, max_num_seqs=cfg.max_num_seqs)
        # verification graphs (and a draft model's decode graphs) stop at a smaller batch
        small = [b for b in buckets if b <= MAX_VERIFY_GRAPH_BATCH] or buckets[:1]
        self.spec = (
            self._speculation(
                cfg, loaded, shape, kv_cache, selector, sampler, small if use_graphs else None
            )
            if speculating
            else None
        )
        # the runner's collaborators, all given here (none is assigned from outside later)
        self.runner = ModelRunner(
            loaded.model,
            shape,
            kv_cache,
            sampler,
            device,
            cfg.max_num_seqs,
            selector=selector,
            verifier=None if self.spec is None else self.spec.verifier,
            mirror=None if tp is None else tp.mirror,
        )
        q = cfg.num_speculative_tokens + 1 if self.spec is not None else 0
        graph_len = min(max_len, self.scheduler.max_seq_len)
        setup = GraphSetup(graph_len, tuple(small), q, use_graphs)
        if tp is not None:  # the workers capture the same graphs (collectives match)
            tp.group.all_gather_objects(setup)
        self._setup_graphs(buckets, setup)
        if tp is not None:
            check_same_plans(tp.group, self.runner.plan_fingerprint())
        self._speculation = NoSpeculation() if self.spec is None else SpeculationHooks(self.spec)

        text = loaded.text
        self.tokenizer: Tokenizer | None = None if text is None else Tokenizer(text)
        gen = {} if text is None else text.generation_config
        tok_eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        eos_ids = generation_eos_ids(gen, *mc.eos_token_ids, tok_eos, vocab_size=mc.vocab_size)
        self.eos_token_id: int | None = eos_ids[0] if eos_ids else None
        self._eos_ids = eos_ids
        # the SamplingParams of requests that give none (generation_config.json's values)
        self.default_sampling_params = default_sampling_params(gen, str(loaded.path or ""))
        self._outputs = OutputProcessor(self.scheduler)  # text, stop strings, stop reasons
        self._ids = itertools.count()
        self._children: dict[str, list[str]] = {}
        # prompt logprobs collected over prefill chunks, until the first output token
        self._prompt_lp: dict[str, list[TokenLogprob | None]] = {}
        self.num_generated_tokens = 0
        # Components holding per-request state register how to forget a request; its end
        # (reported by the scheduler's update) runs them all. Only other objects' methods: a
        # bound method of the engine here would make a cycle that gc.freeze() below keeps
        # alive, with the whole KV pool.
        self._releases: list[Callable[[str], None]] = [self.runner.sampler.release]
        if self.spec is not None:
            self._releases.append(self.spec.release)
        self._releases.append(self._execution.release)
        self._releases.append(self._outputs.release)
        freeze_startup_objects()

    def _setup_graphs(self, buckets: list[int], setup: GraphSetup) -> None:
        """The runner's graphs (``capture_graphs``: the same on every tensor-parallel rank),
        then the step execution: async scheduling (decode steps through the graphs without
        drafts) when the graphs are on and it is enabled."""
        capture_graphs(self.runner, buckets, setup, self.config, lenient=self._tp is None)
        self._execution = SyncExecution(self.runner, self.scheduler)
        if setup.use_graphs and self.config.async_scheduling:
            self._execution = AsyncScheduling(self.runner, self.scheduler)

    def _speculation(
        self, cfg, loaded: LoadedModel, shape, kv_cache, selector, sampler, graph_buckets
    ) -> SpecCoordinator:
        """Proposer, verifier (its kernel selected once for the plan), metrics and adaptive k;
        the runner is built with its verifier. ``graph_buckets``: a draft model's CUDA-graph
        buckets (None: eager)."""
        ctx = base_context(
            Op.REJECTION_SAMPLING,
            device=probe_device(loaded.resolved.device),
            shape=shape,
            block_size=cfg.block_size,
            batch_bucket=cfg.max_num_seqs,
            q_len=cfg.num_speculative_tokens + 1,
            graph_mode=False,
        )
        return SpecCoordinator.from_config(
            cfg,
            selector,
            ctx,
            loaded.resolved,
            kv_cache.num_blocks,
            seeds_of=sampler.seeds_of,
            graph_buckets=graph_buckets,
        )

    @property
    def _async(self) -> AsyncScheduling | None:
        """The async-scheduling strategy when steps launch ahead, else None (host only)."""
        ex = self._execution
        return ex if isinstance(ex, AsyncScheduling) else None

    def _set_execution(self, execution) -> None:
        """Swap the step-execution strategy (``SyncExecution`` or ``AsyncScheduling``): tests
        run async scheduling on a CPU engine, benchmarks compare both. Host only; call between
        steps with no step in flight and no request running."""
        old = self._execution
        self._releases = [r for r in self._releases if r != old.release]
        self._execution = execution
        self._releases.append(execution.release)

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
        if params.stop and self.tokenizer is None:
            raise ValidationError("stop", params.stop, "() (this model has no tokenizer)")

    def _prompt_ids(self, prompt: object, param: str = "prompt") -> tuple[str | None, list[int]]:
        """``(text or None, validated ids)`` of a prompt in any accepted shape (``_prompts``);
        errors about its ids name ``prompt_token_ids``, as before text prompts existed."""
        text, ids = parse_prompt(prompt, self.tokenizer, param)
        return text, self._validate_prompt(ids)

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
        prompt: str | Sequence[int] | dict,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Queue a request; returns its id (``request_id``, or a generated one that no live
        request uses). ``prompt``: token ids, or (with a tokenizer) a str, ``{"prompt": str}``
        or ``{"prompt_token_ids": ids}``; ``params`` None: ``default_sampling_params``. With
        ``params.n > 1`` the samples run as ``{id}#0`` .. ``{id}#{n-1}``; ``id`` is free again
        once all have ended. Raises a ValidationError (a ValueError), before
        anything is queued, for an empty prompt, an id outside the vocabulary, a prompt that can
        never fit, bad params, a ``request_id`` that is not a str or is in use, a ``priority``
        outside ``[-(2**31 - 1), 2**31 - 1]`` (lower runs first under the priority policy), or
        a ``cache_salt`` that is not a str."""
        if self._refusal is not None:
            raise self._refusal
        params = params if params is not None else self.default_sampling_params
        self._validate_params(params)
        ids = self._prompt_ids(prompt)[1]
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
        # samples 1..n-1 fork sample 0's prompt KV (not with prompt logprobs: all positions run)
        leader = names[0] if params.n > 1 and params.prompt_logprobs is None else None
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
                eos_token_ids=self._eos_ids,  # the model's generation config may list several
                stop_token_ids=params.stop_token_ids,
                ignore_eos=params.ignore_eos,
                priority=priority,
                cache_salt=salt,
                sampling_params=params,
                seed=sibling_seed(params.seed, k, params.n),
                prompt_leader=leader if k else None,
            )
            if params.prompt_logprobs is not None:
                self._prompt_lp[name] = [None] * len(ids)
            if OutputProcessor.needs_entry(params, self.tokenizer):
                self._outputs.add(name, params, self.tokenizer, ids)
            self.scheduler.add_request(req)
            self._execution.add(req)
        return rid

    def _forget_request(self, name: str) -> None:
        """The engine's own per-request state: prompt logprobs not yet delivered, and the
        parent id of an n > 1 request once all its samples have ended."""
        self._prompt_lp.pop(name, None)
        self._forget_parent(name)

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
        return any([self.scheduler.abort(n) for n in names])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of every request that got tokens or ended
        (``_step``). Under tensor parallelism anything that escapes a step tears every rank down
        and raises :class:`TensorParallelWorkerError`: the workers may be mid-step."""
        if self._refusal is not None:
            raise self._refusal
        if self._tp is None:
            return self._step()
        try:
            return self._step()
        except TensorParallelWorkerError:
            raise
        except BaseException as e:
            self._tp.mirror.fail(e)
            raise TensorParallelWorkerError(
                f"rank 0 failed mid-step ({type(e).__name__}: {e}); every rank was shut down"
            ) from e

    def _step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs of every request that got tokens or ended.

        schedule -> execute -> update. Launching ahead (``_execution``) and speculation
        (``_speculation``) are strategies plugged in at construction: a step launched by the
        previous call is collected instead of scheduled, and speculation's hooks draft before
        the schedule and record after the step."""
        hooks = self._speculation
        launched = self._execution.take_launched(hooks)
        if launched is not None:
            out, tokens = launched
            seconds = None  # a launched-ahead step has no time of its own
        else:
            t0 = time.perf_counter()
            drafts = hooks.propose(self.scheduler, defer_shadow=self._execution.launches_ahead)
            t_draft = time.perf_counter() - t0  # drafting is part of a speculative step's cost
            out = self.scheduler.schedule(hooks.lookahead(), drafts)
            t1 = time.perf_counter()
            tokens = self._execution.run(out, hooks, bool(self._prompt_lp))
            seconds = time.perf_counter() - t1 + t_draft
            self.runner.timings.schedule += t1 - t0
        t2 = time.perf_counter()
        self._fail_rows(out, tokens)
        hooks.after_step(out, tokens, seconds)
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
        if self._outputs:  # some request streams text or has stop strings / stop ids
            self._outputs.apply(outputs)
        for o in outputs:
            self.num_generated_tokens += len(o.new_token_ids)
            if o.finished:  # every component that keeps per-request state registered here
                for release in self._releases:
                    release(o.request_id)
                self._forget_request(o.request_id)  # (not in the list: no engine <-> list cycle)
        self._speculation.during_step(self.scheduler)  # for the step already on the device
        return outputs

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
            # prompt tokens that went through the model (the rest: prefix cache or a fork)
            "prompt_tokens_computed": self.scheduler.num_prompt_tokens_computed,
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
            "async_steps_ahead": self._execution.steps_ahead,
            "speculative": None if self.spec is None else self.spec.stats(),
        }
