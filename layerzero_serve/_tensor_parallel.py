"""The engine's tensor-parallel session: checks, starting the ranks (spawned workers or the
ranks of ``torchrun``), the per-step mirror, and tearing everything down (``close`` on a clean
shutdown, ``fail`` when a rank dies or a collective fails). One owner of the process groups
and the worker processes: the engine holds one session (None at one rank)."""

from __future__ import annotations

import atexit
import logging

import torch
import torch.distributed as dist

from layerzero_serve._model_source import peek_model_config
from layerzero_serve.config import EngineConfig
from layerzero_serve.distributed import (
    TPGroup,
    check_tensor_parallel,
    free_port,
    init_group,
    owned_group_open,
    torchrun_rank,
)
from layerzero_serve.distributed.step_mirror import StepMirror
from layerzero_serve.distributed.workers import (
    WorkerSet,
    join_store,
    start_workers,
    wait_for_workers,
)
from layerzero_serve.errors import ValidationError

logger = logging.getLogger("layerzero_serve")
_LIVE: set[TPSession] = set()  # closed at interpreter exit: no worker outlives its engine


def _device_type(cfg: EngineConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(cfg.device).type


class TPSession:
    """The process groups, the spawned workers (None under torchrun) and rank 0's mirror."""

    def __init__(self, group: TPGroup, workers: WorkerSet | None) -> None:
        self.group, self.workers = group, workers
        self.mirror = StepMirror(group, self._check, self._torn_down) if group.is_driver else None
        self._closed = False
        _LIVE.add(self)

    def _check(self) -> None:
        if self.workers is not None:
            self.workers.check()

    def _torn_down(self, error: BaseException) -> None:
        logger.error("tensor-parallel group failed, shutting every rank down: %r", error)
        self._shutdown(grace_s=0.0)

    def _shutdown(self, grace_s: float) -> None:
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        if self.workers is not None:
            self.workers.shutdown(grace_s)
        self.group.close()

    def close(self) -> None:
        """Stop the workers (rank 0 tells them to leave, then waits) and free the groups."""
        if self._closed:
            return
        if self.mirror is not None:
            self.mirror.stop()
        self._shutdown(grace_s=10.0)


@atexit.register
def _close_all() -> None:
    for s in list(_LIVE):
        s.close()


def start_tensor_parallel(cfg: EngineConfig) -> TPSession | None:
    """None for one rank outside torchrun; else this process's session: under torchrun its
    rank (``tensor_parallel_size`` must equal the world size), otherwise rank 0 with
    ``tensor_parallel_size - 1`` spawned workers. Every check runs before any process starts.

    Raises:
        TensorParallelError: the size does not split the model or exceeds the devices.
        ValidationError: the size differs from torchrun's world size.
    """
    n = cfg.tensor_parallel_size
    if n > 1 and owned_group_open():
        raise RuntimeError(
            "another tensor-parallel Engine of this process is still open: close it first "
            "(Engine.close(), or build it in a `with` block); one process drives one at a time"
        )
    launched = torchrun_rank()
    if n == 1 and (launched is None or launched[1] != 1):
        return None  # one rank (under torchrun with several: an independent replica)
    device_type = _device_type(cfg)
    mc = peek_model_config(cfg)
    timeout = cfg.distributed_timeout_s
    if launched is not None:
        rank, world, local = launched
        if world != n:
            raise ValidationError(
                "tensor_parallel_size", n, f"1 or {world} (the world size of this torchrun job)"
            )
        check_tensor_parallel(n, mc)
        group = init_group(rank, world, device_type, timeout, local_rank=local,
                           env_init=not dist.is_initialized())  # fmt: skip
        return TPSession(group, None)
    check_tensor_parallel(n, mc, device_type)
    if cfg.device.startswith("cuda:") and torch.device(cfg.device).index != 0:
        raise ValidationError(
            "device",
            cfg.device,
            "'cuda' or 'auto' with tensor_parallel_size > 1 (rank r runs on cuda:r)",
        )
    port = free_port()
    store = join_store(port, n, timeout, master=True)
    workers = start_workers(cfg, n, device_type, port, timeout)
    try:
        wait_for_workers(store, workers, timeout)
        group = init_group(0, n, device_type, timeout, store=store)
    except BaseException:
        workers.shutdown(0.0)
        raise
    return TPSession(group, workers)
