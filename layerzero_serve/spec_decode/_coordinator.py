"""Speculative decoding in the engine's step loop: drafts before the schedule, verification in
the runner, acceptance bookkeeping after the update.

Per step (all host work, microseconds per request):

1. :meth:`SpecCoordinator.propose` picks ``k`` (adaptive: from the batch size and the measured
   acceptance rate; 0 = plain decoding this step) and returns the drafts (request id -> ids),
   which the engine passes to ``Scheduler.schedule``, for every
   running request that is decode-ready and whose sampling is stateless per token
   (:func:`~layerzero_serve.spec_decode.verifier.can_speculate`). The scheduler schedules such a
   request with ``1 + d`` tokens; the KV manager reserves the lookahead slots.
2. The runner verifies (:class:`~layerzero_serve.spec_decode.verifier.SpecVerifier`) and
   returns the accepted drafts plus one target token per request.
3. The scheduler's update rolls rejected positions back (``num_computed_tokens`` and empty
   blocks); :meth:`SpecCoordinator.record` feeds the metrics and the adaptive ``k``.

**Shadow probes** (adaptive mode). While speculation is off, the adaptive ``k`` still needs
acceptance evidence. Verifying a probe would cost a verification pass (about twice a decode
step at batch 64 in graph mode), so a probe step instead asks the proposer for one draft for
each of a rotating slice of at most ``SHADOW_ROWS`` requests, schedules none, and scores them
against the tokens the plain step emits (:meth:`SpecCoordinator.score_shadow`). That score is
exact: the verifier accepts a draft iff it equals the token the target draws with the
request's own random stream for that position, which is the token plain decoding emits. At
start-up the coordinator probes this way until ``MIN_EVIDENCE`` outcomes are in, so the prior
alone never turns speculation on.
"""

from __future__ import annotations

import inspect
import logging
import operator
from collections.abc import Iterable
from itertools import islice

import numpy as np

from layerzero_serve.kernels.spec import Op
from layerzero_serve.selection.plans import batch_buckets
from layerzero_serve.spec_decode._adaptive import AdaptiveK, LinearStepCost
from layerzero_serve.spec_decode._metrics import SpecDecodeMetrics
from layerzero_serve.spec_decode._ngram import NgramProposer
from layerzero_serve.spec_decode._proposer import Proposer
from layerzero_serve.spec_decode.verifier import SpecVerifier, can_speculate
from layerzero_serve.types import Request

# While a batch size has no measured plain-step time, every this many steps one runs without
# drafts so the adaptive choice can compare measured costs.
PLAIN_PROBE_INTERVAL = 8
# Adaptive mode: after a step whose proposer drafted nothing for any row, proposing pauses for
# 1, 2, 4, ... up to this many steps (reset by the first draft): a proposer with nothing to
# offer (n-gram lookup on non-repetitive text) otherwise costs its host time every step
# (~0.3 ms at batch 64 with 4k contexts, about 5% of an 8B decode step) for no gain.
MAX_IDLE_PAUSE = 64
logger = logging.getLogger("layerzero_serve")


def clean_drafts(row: object, limit: int, vocab_size: int) -> list[int]:
    """A proposer's drafts for one request as token ids: at most ``limit`` of them, cut at the
    first entry that is not an integer id in ``[0, vocab_size)`` (a float, a string, an array
    of more than one element, an id outside the vocabulary...). A row that is not a sequence of
    ids gives no drafts. So whatever a (user-written) proposer returns for one request, the
    others are untouched and no draft id reaches an embedding gather.

    Any other exception the row raises while iterated, or an entry raises in ``__index__``
    (the proposer's own code running), propagates: the coordinator counts it as a proposer
    error and drops that row's drafts.

    CUDA graphs: host only, between steps."""
    if row is None or limit <= 0 or isinstance(row, (str, bytes, dict, set, frozenset)):
        return []
    try:
        items = list(islice(iter(row), limit))
    except TypeError:
        return []
    out: list[int] = []
    for t in items:
        try:
            v = operator.index(t)  # ints, numpy ints, 0-d integer tensors (not floats)
        except TypeError:
            break
        if isinstance(t, bool) or not 0 <= v < vocab_size:
            break
        out.append(v)
    return out


# Adaptive mode: draft outcomes (shadow or verified) needed before the measured acceptance rate
# may turn speculation on.
MIN_EVIDENCE = 4.0
# A shadow probe asks the proposer for at most this many requests, a different slice of the
# ready requests each time: probes only estimate the acceptance rate, and asking every row of a
# large batch costs the proposer's per-request host time (n-gram indexing: ~10 us per request).
SHADOW_ROWS = 8


class MeasuredStepCost:
    """Step times measured by the engine, per batch bucket: plain decode steps and verification
    steps (EMA of wall time). ``step_time(n)`` answers the adaptive model's question (the time
    of a step with ``n`` query tokens at the current batch size ``batch``) from measurements
    when both kinds are known for the bucket, else from the default linear prior, so a ratio is
    never formed from mixed units.

    In graph mode a verification step costs the same for every ``k <= k_max`` (rows are padded
    to ``k_max + 1`` tokens), so a measured verification time stands for all ``k``.
    """

    def __init__(self, buckets: list[int], decay: float = 0.8) -> None:
        self.buckets = np.asarray(sorted(buckets) or [1])
        self.decay = decay
        self.plain: dict[int, float] = {}
        self.verify: dict[int, float] = {}
        self.batch = 1
        self._bucket = self.bucket(1)  # the current batch's bucket (set_batch), looked up once
        self._prior = LinearStepCost()

    def set_batch(self, n: int) -> None:
        """The batch size the next ``step_time`` questions are about (once per step)."""
        self.batch = max(n, 1)
        self._bucket = self.bucket(self.batch)

    def bucket(self, n: int) -> int:
        i = int(np.searchsorted(self.buckets, n))
        return int(self.buckets[i]) if i < len(self.buckets) else n

    def observe(self, batch: int, seconds: float, verifying: bool) -> None:
        table = self.verify if verifying else self.plain
        b = self.bucket(batch)
        old = table.get(b)
        table[b] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def measured(self, batch: int) -> bool:
        b = self.bucket(batch)
        return b in self.plain and b in self.verify

    def step_time(self, num_query_tokens: int) -> float:
        b = self._bucket
        if b in self.plain and b in self.verify:
            return self.plain[b] if num_query_tokens <= self.batch else self.verify[b]
        return self._prior.step_time(num_query_tokens)


class SpecCoordinator:
    """Owns the proposer, the verifier, the metrics and the adaptive ``k``.

    Args:
        proposer: drafts per request (``NgramProposer`` for ``speculative_method="ngram"``).
        verifier: the step's verification (its kernel chosen once by the selection engine).
        k_max: most drafts per request and step.
        adaptive: choose ``k`` per step (else always ``k_max``).
    """

    def __init__(
        self,
        proposer: Proposer,
        verifier: SpecVerifier,
        k_max: int,
        adaptive: bool = True,
        vocab_size: int = 1 << 62,
    ) -> None:
        self.proposer = proposer
        self.verifier = verifier
        self.vocab_size = vocab_size
        self.k_max = k_max
        self.costs = MeasuredStepCost(batch_buckets(256))
        self.adaptive = self.new_adaptive() if adaptive else None
        self.metrics = SpecDecodeMetrics(k_max)
        self.last_k = 0
        self._shadow: dict[str, int] = {}  # request id -> this step's unscheduled first draft
        self._shadow_cursor = 0  # where the next shadow probe's slice of the batch starts
        self._decided: tuple[int, bool] | None = None  # next step's (k, shadow), decided early
        self.shadow_due = False  # a launched-ahead step's shadow probe waits for its drafts
        self.shadow_probes = 0  # shadow drafts scored
        self.shadow_hits = 0  # ... that equalled the emitted token
        self._steps = 0
        self._idle_pause = 0  # steps left without proposing (adaptive mode)
        self._idle_next = 1  # the next pause's length
        self.proposer_errors = 0  # proposer calls that raised or returned a malformed batch
        # Proposers that keep per-request state take the ids (NgramProposer's incremental
        # index); a user's proposer with the base signature gets tokens and k only.
        try:
            params = inspect.signature(proposer.propose).parameters
            self._pass_ids = "request_ids" in params
        except Exception as e:  # no signature (or a raising attribute): tokens and k only
            self._pass_ids = False
            self._proposer_failed("inspect", e)

    def new_adaptive(self) -> AdaptiveK:
        """A fresh adaptive ``k`` over this coordinator's measured step costs."""
        return AdaptiveK(self.k_max, step_cost=self.costs, min_evidence=MIN_EVIDENCE)

    @classmethod
    def from_config(
        cls,
        cfg,
        selector,
        kernel_ctx,
        resolved=None,
        draft_kv_blocks: int = 1024,
        seeds_of=None,
        graph_buckets=None,
    ) -> SpecCoordinator:
        """Build from an EngineConfig; ``kernel_ctx`` is the rejection-sampling plan,
        ``resolved`` the target's ResolvedConfig (device, dtype, max length) for a draft model,
        ``draft_kv_blocks`` the draft's KV pool size in blocks, ``seeds_of`` the target
        sampler's ``seeds_of`` (verification draws from the sampler's own streams),
        ``graph_buckets`` a draft model's CUDA-graph buckets (None: it runs eagerly)."""
        choice, kernel = selector.build(Op.REJECTION_SAMPLING, kernel_ctx)
        if isinstance(cfg.speculative_method, Proposer):
            proposer = cfg.speculative_method  # the user's own
        elif cfg.speculative_method == "draft_model":
            from layerzero_serve.spec_decode.draft_model import DraftModelProposer

            proposer = DraftModelProposer(
                cfg.speculative_model,
                kernel_ctx.vocab_size,
                device=str(resolved.device) if resolved else cfg.device,
                dtype=str(resolved.dtype).removeprefix("torch.") if resolved else cfg.dtype,
                block_size=cfg.block_size,
                num_kv_blocks=draft_kv_blocks,
                max_num_seqs=cfg.max_num_seqs,
                max_model_len=resolved.max_model_len if resolved else cfg.max_model_len,
                graph_buckets=graph_buckets,
            )
        else:
            proposer = NgramProposer(
                k=cfg.num_speculative_tokens, min_n=cfg.ngram_min, max_n=cfg.ngram_max
            )
        verifier = SpecVerifier(kernel, seed=cfg.seed, seeds_of=seeds_of)
        verifier.kernel_name = choice.name
        return cls(
            proposer,
            verifier,
            cfg.num_speculative_tokens,
            cfg.adaptive_speculation,
            kernel_ctx.vocab_size or (1 << 62),
        )

    def _decide(self, num_running: int) -> tuple[int, bool]:
        """This step's ``(k, shadow)``: drafts per request and whether they are a shadow probe
        (adaptive choice, plain-step probes, the idle pause). Advances their state."""
        shadow = False
        if self.adaptive is not None:
            self._steps += 1
            self.costs.set_batch(num_running)
            k = self.adaptive.choose(num_running)
            shadow = self.adaptive.probing
            if shadow:
                k = 1  # scored against the plain step's tokens, never verified
            elif k and self.costs.measured(num_running):
                k = self.k_max  # measured (graph) verification costs the same for every k
            elif k and self._steps % PLAIN_PROBE_INTERVAL == 0:
                k = 0  # no plain-step time for this batch size yet: measure one
        else:
            k = self.k_max
        if k and self.adaptive is not None and self._idle_pause:
            self._idle_pause -= 1  # the proposer had nothing lately: do not ask it this step
            k = 0
        return k, shadow

    def next_is_plain(self, num_running: int) -> bool:
        """Decide the next step now, before this step's tokens are known (async scheduling):
        True when it runs without drafts, so it may be launched ahead (it then has no
        ``propose``; a shadow probe decided for it is drafted by :meth:`propose_shadow` once
        this step's tokens are in); otherwise the decision is kept for its ``propose``."""
        k, shadow = self._decide(num_running)
        if k == 0 or shadow:
            self.last_k = 0
            self.shadow_due = shadow and k > 0
            return True
        self._decided = (k, shadow)
        return False

    def propose_shadow(self, running: Iterable[Request]) -> None:
        """Draft the shadow probe ``next_is_plain`` decided for the step already launched, from
        the tokens known now (that step's input token included); its tokens score it."""
        if self.shadow_due:
            self.shadow_due = False
            self._draft(running, 1, shadow=True)

    def propose(
        self, running: Iterable[Request], num_running: int, defer_shadow: bool = False
    ) -> dict[str, list[int]]:
        """This step's drafts (request id -> draft ids) for the decode-ready,
        speculation-capable running requests, an input of ``Scheduler.schedule`` (on a shadow
        probe: none; each probed request's first draft is only remembered). ``defer_shadow``: a
        shadow probe is not drafted now but left to :meth:`propose_shadow` (``shadow_due``),
        which the engine calls once the step is on the device: its drafts are not inputs of
        the step, so the proposer's host time overlaps the step instead of delaying it."""
        if self._decided is not None:  # decided early by next_is_plain
            (k, shadow), self._decided = self._decided, None
        else:
            k, shadow = self._decide(num_running)
        self.last_k = 0 if shadow else k
        if shadow and defer_shadow:
            self.shadow_due = k > 0
        elif k:
            return self._draft(running, k, shadow)
        return {}

    def _draft(self, running: Iterable[Request], k: int, shadow: bool) -> dict[str, list[int]]:
        """Ask the proposer for ``k`` drafts per ready request (a rotating slice of them for a
        shadow probe); returns them (a shadow probe returns none and remembers the first)."""
        ready = [
            r
            for r in running
            if r.num_computed_tokens == len(r.all_token_ids) - 1
            and can_speculate(r.sampling_params)
        ]
        if not ready:
            return {}
        if shadow and len(ready) > SHADOW_ROWS:  # a rotating slice of the batch
            at = self._shadow_cursor % len(ready)
            ready = (ready[at:] + ready[:at])[:SHADOW_ROWS]
            self._shadow_cursor = at + SHADOW_ROWS
        drafts = self._ask(ready, k, shadow)
        drafted = False
        failed = None
        out: dict[str, list[int]] = {}
        for r, row in zip(ready, drafts, strict=True):
            room = r.stop_len - len(r.all_token_ids) - 1  # leave room for the target's token
            try:  # iterating the row runs the proposer's code (its iterators, __index__)
                d = clean_drafts(row, min(room, k), self.vocab_size)
            except Exception as e:  # only this row loses its drafts
                d, failed = [], e
            if d:
                drafted = True
                if shadow:
                    self._shadow[r.request_id] = d[0]
                else:
                    out[r.request_id] = d
        if failed is not None:  # counted once per step, like a failed call
            self._proposer_failed("rows", failed)
        if self.adaptive is not None:
            if drafted:
                self._idle_next = 1
            else:
                self._idle_pause = self._idle_next
                self._idle_next = min(2 * self._idle_next, MAX_IDLE_PAUSE)
        return out

    def _ask(self, ready: list[Request], k: int, shadow: bool = False) -> list:
        """The proposer's rows for ``ready``; a call that raises or returns anything but one
        row per request counts as no drafts this step (logged), never as an engine error. A
        shadow probe omits the ids where the proposer allows it (``probe_without_ids``)."""
        tokens = [r.all_token_ids for r in ready]
        try:
            if self._pass_ids and not (shadow and self.proposer.probe_without_ids):
                ids = [r.request_id for r in ready]
                drafts = self.proposer.propose(tokens, k, request_ids=ids)
            else:
                drafts = self.proposer.propose(tokens, k)
            drafts = list(drafts)
            if len(drafts) != len(ready):
                raise ValueError(f"{len(drafts)} rows for {len(ready)} requests")
        except Exception as e:  # a plug-in's failure must not stop the engine
            self._proposer_failed("propose", e)
            return [None] * len(ready)
        return drafts

    def proposer_name(self) -> str:
        """The proposer's ``name`` (its class name when reading it fails or gives no str)."""
        try:
            name = self.proposer.name
        except Exception:
            name = None
        return name if isinstance(name, str) else type(self.proposer).__name__

    def _proposer_failed(self, what: str, e: BaseException) -> None:
        """Count and log (the 1st, 2nd, 4th, 8th ... time) a proposer failure: it costs drafts
        (or per-request state), never a request or the engine."""
        self.proposer_errors += 1
        n = self.proposer_errors
        if n & (n - 1) == 0:
            try:  # a hostile exception's __str__ must not escape from here either
                detail = f"{type(e).__name__}: {e}"
            except Exception:
                detail = type(e).__name__
            logger.warning(
                "proposer %s failed in %s (%d times so far), no drafts from it: %s",
                self.proposer_name(), what, n, detail,
            )  # fmt: skip

    def drop_shadow(self) -> None:
        """Forget shadow drafts whose step will not be scored (it was dropped)."""
        self._shadow.clear()

    def score_shadow(self, requests: list[Request], tokens) -> None:
        """Score this step's shadow drafts against the tokens the step emitted (``tokens[row]``
        for ``requests[row]``) and feed the adaptive ``k``; a no-op without shadow drafts."""
        if not self._shadow:
            return
        shadow, self._shadow = self._shadow, {}
        hits = []
        for row, r in enumerate(requests):
            d = shadow.get(r.request_id)
            if d is not None and tokens[row]:
                hits.append(int(tokens[row][0] == d))
        if hits and self.adaptive is not None:
            self.shadow_probes += len(hits)
            self.shadow_hits += sum(hits)
            self.adaptive.update([1] * len(hits), hits)

    def record(self, num_drafts: list[int], num_accepted: list[int], request_ids: list[str]):
        """Fold one step's verification results into the metrics and the adaptive ``k``."""
        if not num_drafts:
            return
        self.metrics.update(num_drafts, num_accepted, request_ids)
        if self.adaptive is not None:
            self.adaptive.update(num_drafts, num_accepted)

    def observe_step(self, batch: int, seconds: float, verifying: bool) -> None:
        """A pure decode step's wall time (``verifying``: it carried drafts)."""
        self.costs.observe(batch, seconds, verifying)

    def release(self, request_id: str) -> None:
        """Forget a finished request: the proposer's state (a ``release`` that raises is
        counted and logged as a proposer error; the request's output is still delivered) and
        its metrics."""
        try:
            self.proposer.release(request_id)
        except Exception as e:
            self._proposer_failed("release", e)
        self.metrics.pop_request(request_id)

    def stats(self) -> dict[str, object]:
        m = self.metrics
        return {
            "method": self.proposer_name(),
            "k_max": self.k_max,
            "last_k": self.last_k,
            "drafts": int(m.total.num_drafts),
            "drafted_tokens": int(m.total.num_draft_tokens),
            "accepted_tokens": int(m.total.num_accepted_tokens),
            "acceptance_rate": m.acceptance_rate,
            "mean_accepted_length": m.mean_accepted_length,
            "acceptance_rate_per_position": m.acceptance_rate_per_position().tolist(),
            "verification_kernel": getattr(self.verifier, "kernel_name", ""),
            "shadow_probes": self.shadow_probes,
            "proposer_errors": self.proposer_errors,
            "shadow_hits": self.shadow_hits,
        }
