"""Pick torch's intra-op thread count for CPU execution by measuring, not guessing.

Decode on a CPU runs hundreds of small ops per step; each op wakes the intra-op thread pool,
and on some machines (small VMs in particular) that wake-up costs more than the op. The
measured difference can be 4-50x, in either direction depending on the machine and model
width, so ``auto`` times a few projections of the model's width with each candidate count.
"""

from __future__ import annotations

import logging
import numbers
import os
import time

import torch

logger = logging.getLogger("layerzero_serve")

# Upper bound of a requested thread count: oversubscription past a few threads per core only
# slows things down, and OpenMP fails (or the process crashes) with tens of thousands.
MAX_CPU_THREADS = max((os.cpu_count() or 1) * 4, 256)


def check_cpu_threads(requested: object) -> int | None:
    """``requested`` as an int in ``[1, MAX_CPU_THREADS]``, or None (measure at start-up)."""
    if requested is None:
        return None
    if (
        isinstance(requested, bool)
        or not isinstance(requested, numbers.Integral)
        or not 1 <= requested <= MAX_CPU_THREADS
    ):
        from layerzero_serve.errors import ValidationError

        raise ValidationError(
            "cpu_threads", requested, f"None or an integer in [1, {MAX_CPU_THREADS}]"
        )
    return int(requested)


def _time_ops(hidden: int, threads: int, reps: int = 20) -> float:
    torch.set_num_threads(threads)
    x = torch.randn(1, hidden)
    w = torch.randn(hidden, hidden)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - t0) / reps


def choose_cpu_threads(hidden_size: int, requested: int | None) -> int:
    """Set and return torch's intra-op thread count. ``requested`` wins when given; otherwise
    the faster of 1 thread and the current default on a decode-sized projection."""
    requested = check_cpu_threads(requested)
    default = torch.get_num_threads()
    if requested is not None:
        torch.set_num_threads(requested)
        logger.info("CPU threads: %d (requested)", requested)
        return requested
    if default <= 1:
        return default
    width = min(hidden_size, 4096)
    t_many = min(_time_ops(width, default) for _ in range(2))
    t_one = min(_time_ops(width, 1) for _ in range(2))
    best = 1 if t_one < t_many else default
    torch.set_num_threads(best)
    logger.info(
        "CPU threads: %d (measured %.0f us/op with 1 thread vs %.0f us with %d)",
        best,
        t_one * 1e6,
        t_many * 1e6,
        default,
    )
    return best
