"""Speculative decoding in the engine's step loop: drafts before the schedule, verification in
the runner, acceptance bookkeeping after the update.

Per step (all host work, microseconds per request):

1. :meth:`SpecCoordinator.propose` picks ``k`` (adaptive: from the batch size and the measured
   acceptance rate; 0 = plain decoding this step) and sets ``request.spec_token_ids`` for every
   running request that is decode-ready and whose sampling is stateless per token
   (:func:`~layerzero_serve.spec_decode.verifier.can_speculate`). The scheduler schedules such a
   request with ``1 + d`` tokens; the KV manager reserves the lookahead slots.
2. The runner verifies (:class:`~layerzero_serve.spec_decode.verifier.SpecVerifier`) and
   returns the accepted drafts plus one target token per request.
3. The scheduler's update rolls rejected positions back (``num_computed_tokens`` and empty
   blocks); :meth:`SpecCoordinator.record` feeds the metrics and the adaptive ``k``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from layerzero_serve.kernels.spec import Op
from layerzero_serve.spec_decode.adaptive import AdaptiveK
from layerzero_serve.spec_decode.metrics import SpecDecodeMetrics
from layerzero_serve.spec_decode.ngram import NgramProposer
from layerzero_serve.spec_decode.proposer import Proposer
from layerzero_serve.spec_decode.verifier import SpecVerifier, can_speculate
from layerzero_serve.types import Request


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
        self.adaptive = AdaptiveK(k_max) if adaptive else None
        self.metrics = SpecDecodeMetrics(k_max)
        self.last_k = 0
        # Proposers that keep per-request state take the ids (NgramProposer's incremental
        # index); a user's proposer with the base signature gets tokens and k only.
        params = inspect.signature(proposer.propose).parameters
        self._pass_ids = "request_ids" in params

    @classmethod
    def from_config(cls, cfg, selector, kernel_ctx) -> SpecCoordinator:
        """Build from an EngineConfig; ``kernel_ctx`` is the rejection-sampling plan."""
        choice = selector.select(Op.REJECTION_SAMPLING, kernel_ctx)
        kernel = choice.spec.factory(kernel_ctx)
        if isinstance(cfg.speculative_method, Proposer):
            proposer = cfg.speculative_method  # the user's own
        else:
            proposer = NgramProposer(
                k=cfg.num_speculative_tokens, min_n=cfg.ngram_min, max_n=cfg.ngram_max
            )
        verifier = SpecVerifier(kernel, seed=cfg.seed)
        verifier.kernel_name = choice.name
        return cls(
            proposer,
            verifier,
            cfg.num_speculative_tokens,
            cfg.adaptive_speculation,
            kernel_ctx.vocab_size or (1 << 62),
        )

    def propose(self, running: Iterable[Request], num_running: int) -> None:
        """Set this step's drafts on the decode-ready, speculation-capable running requests."""
        k = self.adaptive.choose(num_running) if self.adaptive is not None else self.k_max
        self.last_k = k
        if k == 0:
            return
        ready = [
            r
            for r in running
            if r.num_computed_tokens == len(r.all_token_ids) - 1
            and can_speculate(r.sampling_params)
        ]
        if not ready:
            return
        tokens = [r.all_token_ids for r in ready]
        if self._pass_ids:
            drafts = self.proposer.propose(tokens, k, request_ids=[r.request_id for r in ready])
        else:
            drafts = self.proposer.propose(tokens, k)
        vocab_ok = self.vocab_size
        for r, d in zip(ready, drafts, strict=True):
            room = r.stop_len - len(r.all_token_ids) - 1  # leave room for the target's token
            if d and room > 0:
                d = [int(t) for t in d[: min(room, k)]]
                # A draft id outside the vocabulary would reach the embedding gather: cut the
                # drafts there (the verifier would reject it anyway).
                bad = next((j for j, t in enumerate(d) if not 0 <= t < vocab_ok), len(d))
                if bad:
                    r.spec_token_ids = d[:bad]

    def record(self, num_drafts: list[int], num_accepted: list[int], request_ids: list[str]):
        """Fold one step's verification results into the metrics and the adaptive ``k``."""
        if not num_drafts:
            return
        self.metrics.update(num_drafts, num_accepted, request_ids)
        if self.adaptive is not None:
            self.adaptive.update(num_drafts, num_accepted)

    def release(self, request_id: str) -> None:
        self.proposer.release(request_id)
        self.metrics.pop_request(request_id)

    def stats(self) -> dict[str, object]:
        m = self.metrics
        return {
            "method": self.proposer.name,
            "k_max": self.k_max,
            "last_k": self.last_k,
            "drafts": int(m.total.num_drafts),
            "drafted_tokens": int(m.total.num_draft_tokens),
            "accepted_tokens": int(m.total.num_accepted_tokens),
            "acceptance_rate": m.acceptance_rate,
            "mean_accepted_length": m.mean_accepted_length,
            "acceptance_rate_per_position": m.acceptance_rate_per_position().tolist(),
            "verification_kernel": getattr(self.verifier, "kernel_name", ""),
        }
