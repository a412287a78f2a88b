"""Continuous-batching scheduler (pure CPU). Installed as ``layerzero_serve.scheduler``."""

from layerzero_serve.scheduler.config import SchedulerConfig
from layerzero_serve.scheduler.scheduler import Runner, Scheduler

__all__ = ["Runner", "Scheduler", "SchedulerConfig"]
