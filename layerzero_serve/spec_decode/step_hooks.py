"""Speculation as the engine's step loop sees it: four hooks around schedule -> execute ->
update, so the loop itself has no speculative branches.

- ``propose(scheduler, defer_shadow)`` before the schedule: this step's drafts (an input of
  ``Scheduler.schedule``) and, through ``lookahead()``, the draft slots to reserve;
- ``during_step(scheduler)`` once the step is on the device: a deferred shadow probe drafts now,
  overlapping the step;
- ``after_step(out, tokens, seconds)``: drafts and accepted drafts of the verification rows,
  the step's time for the adaptive ``k``, shadow probes scored;
- ``drop_step()``: a launched step was dropped unseen (its shadow drafts go with it);
- ``next_is_plain(batch)``: whether the next step can be launched ahead (no drafts).

``NoSpeculation`` is the same interface doing nothing (speculation off); ``SpeculationHooks``
drives a :class:`SpecCoordinator`.

CUDA graphs: host only, between the steps the runner launches or replays.
"""

from __future__ import annotations

from layerzero_serve.spec_decode._coordinator import SpecCoordinator
from layerzero_serve.types import SchedulerOutput, StepTokens

__all__ = ["NoSpeculation", "SpeculationHooks"]


class NoSpeculation:
    """The hooks of a loop without speculation: no drafts, nothing to record."""

    last_k = 0

    def propose(self, scheduler, defer_shadow: bool) -> None:
        return None

    def lookahead(self) -> int | None:
        return None  # the scheduler's configured lookahead (0 without speculation)

    def during_step(self, scheduler) -> None:
        pass

    def after_step(self, out: SchedulerOutput, tokens: StepTokens, seconds: float | None) -> None:
        pass

    def drop_step(self) -> None:
        pass

    def next_is_plain(self, batch: int) -> bool:
        return True


class SpeculationHooks:
    """The step loop's speculation, driving ``coordinator`` (proposer, verifier, metrics,
    adaptive ``k``). The runner verifies the drafts with the coordinator's verifier, given to
    it at construction."""

    def __init__(self, coordinator: SpecCoordinator) -> None:
        self.coordinator = coordinator

    @property
    def last_k(self) -> int:
        """Drafts per request chosen for the step last proposed (0: plain decoding)."""
        return self.coordinator.last_k

    def propose(self, scheduler, defer_shadow: bool) -> dict[str, list[int]]:
        running = scheduler.running
        return self.coordinator.propose(running.items, len(running), defer_shadow=defer_shadow)

    def lookahead(self) -> int | None:
        # speculation off this step (adaptive k = 0): no lookahead slots to reserve
        return None if self.coordinator.last_k else 0

    def during_step(self, scheduler) -> None:
        if self.coordinator.shadow_due:  # deferred: drafted while the step runs
            self.coordinator.propose_shadow(scheduler.running.items)

    def drop_step(self) -> None:
        self.coordinator.drop_shadow()

    def next_is_plain(self, batch: int) -> bool:
        return self.coordinator.next_is_plain(batch)

    def after_step(self, out: SchedulerOutput, tokens: StepTokens, seconds: float | None) -> None:
        """Drafts and accepted drafts of this step's verification rows, and the step's time
        (``seconds``; None: unknown, e.g. a step launched ahead) when it was a pure decode
        step (no prefill in it)."""
        spec = self.coordinator
        spec.score_shadow(out.requests, tokens)
        if not spec.last_k:  # no drafts this step: only its time, when it was pure decode
            if seconds is not None and out.num_batched_tokens == len(out.requests):
                spec.observe_step(len(out.requests), seconds, False)
            return
        total = sum(len(d) for d in out.drafts.values())
        if out.num_batched_tokens == len(out.requests) + total:  # no prefill in the step
            spec.observe_step(len(out.requests), seconds, total > 0)
        drafts, accepted, ids = [], [], []
        for row, req in enumerate(out.requests):
            d = len(out.drafts.get(req.request_id, ()))
            if d and tokens[row]:
                drafts.append(d)
                accepted.append(len(tokens[row]) - 1)
                ids.append(req.request_id)
        spec.record(drafts, accepted, ids)
