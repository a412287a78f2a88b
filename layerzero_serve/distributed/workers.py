"""Worker ranks of a tensor-parallel engine: the processes rank 0 starts itself (spawn), and what
any worker rank runs (also a torchrun rank > 0): build the same model side as rank 0 (its share
of the weights, the same kernel plans, a KV pool of the agreed size, the same graphs), check
that every rank chose the same kernels, then replay rank 0's per-step messages until it stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback

import torch.distributed as dist

from layerzero_serve.distributed._group import TPGroup, init_group
from layerzero_serve.distributed.step_mirror import TensorParallelWorkerError, serve_steps

logger = logging.getLogger("layerzero_serve")
_PR_SET_PDEATHSIG = 1


class PlanMismatchError(RuntimeError):
    """Tensor-parallel ranks selected different kernels for the same plan (names the op)."""


def check_same_plans(group: TPGroup, fingerprint: dict[str, str]) -> None:
    """All-gather every rank's ``{op: kernel}`` and raise :class:`PlanMismatchError` naming the
    first op where a rank differs from rank 0 (every rank raises: none is left waiting)."""
    every = group.all_gather_objects(fingerprint)
    ref = every[0]
    for rank, fp in enumerate(every[1:], start=1):
        for op in sorted(set(ref) | set(fp)):
            if ref.get(op) != fp.get(op):
                raise PlanMismatchError(
                    f"tensor-parallel ranks chose different kernels for {op}: rank 0 "
                    f"{ref.get(op)!r}, rank {rank} {fp.get(op)!r}; lock it for every rank "
                    "(LZ_KERNEL_POLICY) or make the ranks' devices alike"
                )


def run_worker(cfg, group: TPGroup) -> None:
    """Everything a worker rank does, from loading its share to rank 0's STOP. Host loop."""
    from layerzero_serve._engine_setup import build_model_side, capture_graphs
    from layerzero_serve.runner import ModelRunner
    from layerzero_serve.sampling import Sampler

    side = build_model_side(cfg, group)
    device = side.loaded.resolved.device
    runner = ModelRunner(
        side.loaded.model, side.shape, side.kv_cache, Sampler(seed=cfg.seed), device,
        cfg.max_num_seqs, selector=side.selector,
    )  # fmt: skip
    setup = group.all_gather_objects(None)[0]  # rank 0's GraphSetup
    capture_graphs(runner, side.buckets, setup, cfg, lenient=False, progress=False)
    check_same_plans(group, runner.plan_fingerprint())
    serve_steps(runner, group)


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when rank 0's process dies, however it dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def worker_main() -> None:
    """Entry point of a worker process (``python -m layerzero_serve.distributed.workers``):
    its settings come pickled on stdin, so the user's ``__main__`` is never re-imported (no
    ``if __name__ == "__main__"`` guard is needed in scripts that build an Engine)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    logging.basicConfig(level=logging.WARNING)
    cfg, rank, world_size, device_type, port, timeout_s = pickle.load(sys.stdin.buffer)
    group = None
    try:
        store = join_store(port, world_size, timeout_s)
        store.set(f"lz_ready_{rank}", "1")
        group = init_group(rank, world_size, device_type, timeout_s, store=store)
        run_worker(cfg, group)
    except BaseException:  # noqa: BLE001 - report, then exit non-zero: rank 0 sees the code
        print(f"layerzero_serve tensor-parallel worker {rank} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        sys.exit(1)
    finally:
        if group is not None:
            group.close()


class WorkerSet:
    """The worker processes rank 0 started (ranks 1..N-1). ``check`` raises when one is gone;
    ``shutdown`` waits for them to leave, then terminates and kills what is left."""

    def __init__(self, procs: list[subprocess.Popen]) -> None:
        self.procs = procs

    def check(self) -> None:
        for rank, p in enumerate(self.procs, start=1):
            code = p.poll()
            if code is not None:
                raise TensorParallelWorkerError(
                    f"tensor-parallel worker rank {rank} (pid {p.pid}) exited with code {code}"
                    " (its traceback, if any, is on stderr); every rank was shut down"
                )

    def shutdown(self, grace_s: float = 10.0) -> None:
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(2.0)


def join_store(port: int, world_size: int, timeout_s: float, master: bool = False):
    """The rendezvous store on this host's ``port`` (rank 0 serves it)."""
    return dist.TCPStore("127.0.0.1", port, world_size, is_master=master,
                         timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)  # fmt: skip


def wait_for_workers(store, workers: WorkerSet, timeout_s: float) -> None:
    """Wait until every worker joined ``store``, polling their processes: a worker that exits
    first raises :class:`TensorParallelWorkerError` at once (not after the timeout)."""
    keys = [f"lz_ready_{r}" for r in range(1, len(workers.procs) + 1)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        workers.check()
        if time.monotonic() > deadline:
            raise TensorParallelWorkerError(
                f"tensor-parallel workers did not join within distributed_timeout_s={timeout_s}"
            )
        time.sleep(0.02)


def start_workers(cfg, world_size: int, device_type: str, port: int,
                  timeout_s: float) -> WorkerSet:  # fmt: skip
    """Start ranks 1..world_size-1 as fresh interpreters in their own session (Ctrl-C at a
    terminal reaches rank 0 only); each builds its own share and joins the store rank 0
    serves on ``port``. ``cfg`` is sent without a speculation proposer: drafts are rank
    0's."""
    sent = dataclasses.replace(cfg, speculative_method=None, speculative_model=None)
    procs = []
    for rank in range(1, world_size):
        p = subprocess.Popen(
            [sys.executable, "-m", "layerzero_serve.distributed.workers"],
            stdin=subprocess.PIPE,
            cwd=os.getcwd(),
            start_new_session=True,
        )
        p.stdin.write(pickle.dumps((sent, rank, world_size, device_type, port, timeout_s)))
        p.stdin.close()
        procs.append(p)
    return WorkerSet(procs)


if __name__ == "__main__":
    worker_main()
