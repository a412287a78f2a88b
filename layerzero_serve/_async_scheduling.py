"""Async scheduling (``EngineConfig.async_scheduling``): while the GPU computes decode step N,
step N+1 is already on the device, so the host's per-step work (reading N's tokens, updating
and scheduling the requests, staging the next inputs) overlaps the GPU's instead of leaving it
idle between steps.

It applies to the steady state of decoding through the captured graphs: every running request
decodes one token, none waits for admission, no drafts (speculation is off, or the adaptive
``k`` decided 0 for the next step without asking the proposer), and every request samples
statelessly (no penalties, bias, masks, min-tokens or logprobs, whose state would have to
advance with the unseen token). Step N+1 is then the plain continuation of step N, scheduled
by ``Scheduler.schedule_next_decode`` before N's tokens are known: its input ids are N's
sampled ids, copied on the device. A request that ends with N's token (EOS, a stop id) has
computed one token too many in N+1: its row is dropped when N+1's tokens are applied, and the
KV it wrote lies in its own freed blocks. Anything else (an admission, a finish by length, a
prefill, a short pool) makes the next step a synchronous one. The tokens are the same as
without async scheduling.
"""

from __future__ import annotations

import time

from layerzero_serve.runner import PendingDecode, collect_decode, launch_decode
from layerzero_serve.spec_decode.verifier import can_speculate
from layerzero_serve.types import Request, RequestStatus, SchedulerOutput, StepTokens

__all__ = ["AsyncScheduling"]


class AsyncScheduling:
    """The engine's side: which steps may launch ahead, and the step in flight."""

    def __init__(self, runner, scheduler) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.ahead: tuple[SchedulerOutput, PendingDecode] | None = None
        self._stateful: set[str] = set()  # running requests whose sampling keeps state
        self.steps_ahead = 0  # steps launched before the previous one's tokens were read
        self.launches_ahead = True

    def add(self, request: Request) -> None:
        if not can_speculate(request.sampling_params):  # the same "stateless" test
            self._stateful.add(request.request_id)

    def release(self, request_id: str) -> None:
        self._stateful.discard(request_id)

    def launch(self, out: SchedulerOutput, prompt_logprobs_pending: bool) -> PendingDecode | None:
        """Launch a schedule whose rows all decode one token, or None (run it synchronously)."""
        if self._stateful or prompt_logprobs_pending or not out.requests:
            return None
        return launch_decode(self.runner, out) if out.is_pure_decode() else None

    def launch_next(self, pending: PendingDecode, hooks=None) -> None:
        """Put the step after ``pending`` on the device when it is the plain continuation
        (with speculation configured: when its ``k`` is decided 0 now, see
        ``SpeculationHooks.next_is_plain``)."""
        nxt = self.scheduler.schedule_next_decode(pending.out)
        if nxt is None:
            return
        if hooks is not None and not hooks.next_is_plain(len(nxt.requests)):
            self.scheduler.unschedule(nxt)  # not launched
            return
        ahead = launch_decode(self.runner, nxt, prev=pending)
        if ahead is not None:
            self.ahead = (nxt, ahead)
            self.steps_ahead += 1

    # ---- the step loop's execution strategy (see _step_execution) ---------------------------
    def take_launched(self, hooks) -> tuple[SchedulerOutput, StepTokens] | None:
        """The step launched by the previous call, with its tokens; the one after it is
        launched first (when it continues plainly). None when no step is in flight, or the
        one in flight was stale (dropped, with ``hooks.drop_step()``)."""
        if self.ahead is None:
            return None
        if self.take_stale():
            hooks.drop_step()  # its shadow drafts go with it
            return None
        out, pending = self.ahead
        self.ahead = None
        t0 = time.perf_counter()
        self.launch_next(pending, hooks)
        self.runner.timings.schedule += time.perf_counter() - t0
        return out, self.collect(pending)

    def run(self, out: SchedulerOutput, hooks, stateful_pending: bool) -> StepTokens:
        """Run ``out``: launched without waiting when it is a plain decode step (and the next
        step launched before its tokens are read), else synchronously."""
        pending = None if hooks.last_k else self.launch(out, stateful_pending)
        hooks.during_step(self.scheduler)
        if pending is None:
            return self.runner.execute(out) if out.requests else StepTokens()
        self.launch_next(pending, hooks)  # step N+1 on the device before N's tokens
        return self.collect(pending)

    def collect(self, pending: PendingDecode) -> StepTokens:
        return collect_decode(self.runner, pending)

    def take_stale(self) -> bool:
        """Drop a launched-ahead step none of whose requests still runs (they all ended with
        the previous step, and the engine went idle): its results are meaningless. True when
        one was dropped."""
        if self.ahead is None:
            return False
        out, pending = self.ahead
        if any(r.status is RequestStatus.RUNNING for r in out.requests):
            return False
        self.ahead = None
        collect_decode(self.runner, pending)  # wait for its copies before its buffers go
        return True
