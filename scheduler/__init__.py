"""Continuous-batching scheduler (pure CPU). Installed as ``layerzero_serve.scheduler``."""

from layerzero_serve.scheduler._config import SchedulerConfig, check_admission
from layerzero_serve.scheduler._scheduler import Runner, Scheduler

__all__ = [
    "Runner",
    "Scheduler",
    "SchedulerConfig",
    "check_admission",
]
