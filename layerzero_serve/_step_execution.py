"""How a scheduled step runs, as a strategy of the engine's step loop.

``SyncExecution`` runs each schedule at once (``ModelRunner.execute``).
``_async_scheduling.AsyncScheduling`` launches the next plain decode step before this one's
tokens are read. Both offer:

- ``take_launched(hooks)``: the (schedule, tokens) of a step launched by the previous call, or
  None (the loop then schedules a new step);
- ``run(out, hooks, stateful_pending)``: run ``out`` and return its tokens (calling
  ``hooks.during_step`` once the step is on the device);
- ``add(request)`` / ``release(request_id)``: a request's start and end (registered with the
  engine's releases); ``launches_ahead`` and ``steps_ahead`` for the loop and its stats.

CUDA graphs: host only; the runner replays its graphs.
"""

from __future__ import annotations

from layerzero_serve.types import SchedulerOutput, StepTokens

__all__ = ["SyncExecution"]


class SyncExecution:
    """Each schedule runs at once; nothing is ever in flight between calls."""

    steps_ahead = 0
    launches_ahead = False

    def __init__(self, runner, scheduler) -> None:
        self.runner = runner
        self.scheduler = scheduler

    def take_launched(self, hooks) -> None:
        return None

    def run(self, out: SchedulerOutput, hooks, stateful_pending: bool) -> StepTokens:
        hooks.during_step(self.scheduler)
        return self.runner.execute(out) if out.requests else StepTokens()

    def add(self, request) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass
