"""The tensor-parallel group of one engine: torch.distributed process groups and the three
collectives the sharded model needs.

Three groups over the same ranks:

* the **device group** (NCCL on CUDA, gloo on the CPU) carries the model's all-reduces and the
  logits' all-gather; its timeout is ``EngineConfig.distributed_timeout_s``, so a hung rank
  fails a step instead of hanging it;
* the **idle group** (gloo) carries only the 8-int header of rank 0's next message: workers
  wait on it between steps for as long as the engine stays idle, so their timeout on it is
  long (a dead peer is still seen at once: its sockets close); rank 0's is the step timeout;
* the **step group** (gloo, the short timeout) carries the rest of each message, so a worker
  that stops answering fails rank 0's step after ``distributed_timeout_s``.

:class:`TPGroup` owns both; the model holds it as ``model.tp`` (None at one rank: no collective
is called, so the single-GPU hot path is unchanged).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

logger = logging.getLogger("layerzero_serve")
IDLE_TIMEOUT = datetime.timedelta(days=30)  # host group: workers wait this long between steps


class TPGroup:
    """Rank ``rank`` of ``world_size``; collectives over the device group.

    CUDA graphs: ``all_reduce_`` and ``all_gather_rows`` are capturable on NCCL (they run on
    the current stream); the host-group calls are host only.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device,
                 device_group, idle_group, step_group, owns_default: bool) -> None:  # fmt: skip
        self.rank, self.world_size, self.device = rank, world_size, device
        self.device_group, self.idle_group, self.step_group = device_group, idle_group, step_group
        self._owns_default = owns_default  # destroy the default group on close
        self._nccl = dist.get_backend(device_group) == "nccl"

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ---- model collectives (device group) --------------------------------------------------
    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks in place; returns ``x``."""
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``x [S, v]`` of every rank -> ``[S, world_size * v]`` (rank order along dim 1)."""
        n = self.world_size
        if self._nccl:
            out = torch.empty((n * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(out, x.contiguous(), group=self.device_group)
            parts = out.view(n, x.shape[0], x.shape[1]).unbind(0)
        else:
            parts = [torch.empty_like(x) for _ in range(n)]
            dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=1)

    def broadcast_device(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape and dtype), device group."""
        dist.broadcast(x, src=0, group=self.device_group)
        return x

    # ---- host messages (idle and step groups) -------------------------------------------------
    def broadcast_header(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's CPU header ``x`` into every rank's; workers may wait here indefinitely."""
        dist.broadcast(x, src=0, group=self.idle_group)
        return x

    def broadcast_host(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's CPU tensor ``x`` into every rank's (same shape and dtype), within the
        timeout. Host only."""
        dist.broadcast(x, src=0, group=self.step_group)
        return x

    def all_gather_objects(self, obj: object) -> list[object]:
        """Every rank's picklable ``obj``, in rank order (start-up checks only)."""
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.step_group)
        return out

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (e.g. the KV blocks that fit on all)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.step_group)
        return int(t.item())

    def close(self) -> None:
        """Destroy the groups (and the default group when this engine created it)."""
        if not dist.is_initialized():
            return
        # a peer already gone leaves nothing to free: errors here are ignored
        for g in (self.idle_group, self.step_group, self.device_group):
            if g is not None and g is not dist.GroupMember.WORLD:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group(g)
        if self._owns_default:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            _OWNED_DEFAULT.clear()


def free_port() -> int:
    """A free TCP port on this host for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """Rank ``local_rank``'s device on this host: ``cuda:local_rank`` or the CPU."""
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_group(rank: int, world_size: int, device_type: str, timeout_s: float,
               store=None, local_rank: int | None = None, env_init: bool = False
               ) -> TPGroup:  # fmt: skip
    """Join the default process group through ``store`` (spawn mode: this engine owns the
    group), or through torchrun's environment (``env_init``), or reuse the one already
    initialised (neither); then make the three groups. Host only."""
    device = rank_device(device_type, rank if local_rank is None else local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device_type == "cuda" else "gloo"
    owns = store is not None or env_init
    if owns:
        kwargs = {"device_id": device} if backend == "nccl" else {}
        if store is not None:
            kwargs["store"] = store
        else:
            kwargs["init_method"] = "env://"
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                **kwargs)  # fmt: skip
        _OWNED_DEFAULT.append(True)
        device_group = dist.GroupMember.WORLD
    else:
        device_group = dist.new_group(backend=backend, timeout=timeout)
    # a gloo timeout is each process's own: workers wait for rank 0's next header as long as
    # it stays idle, rank 0 waits for a worker (the broadcast may need it to be receiving)
    # no longer than the step timeout
    idle_group = dist.new_group(backend="gloo", timeout=timeout if rank == 0 else IDLE_TIMEOUT)
    step_group = dist.new_group(backend="gloo", timeout=timeout)
    logger.info("tensor parallel: rank %d of %d on %s (%s)", rank, world_size, device, backend)
    return TPGroup(rank, world_size, device, device_group, idle_group, step_group, owns)


_OWNED_DEFAULT: list[bool] = []  # this process's default group is an open engine's


def owned_group_open() -> bool:
    """True while an engine of this process holds the default process group it created."""
    return bool(_OWNED_DEFAULT) and dist.is_available() and dist.is_initialized()


def torchrun_rank() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when this process was started by torchrun (its
    environment) or already joined a default process group (not one an engine of this
    process created); else None."""
    if owned_group_open():
        return None
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return dist.get_rank(), dist.get_world_size(), local
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    return None
