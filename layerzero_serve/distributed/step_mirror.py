"""Rank 0's per-step messages to the tensor-parallel workers, and the workers' side that replays
them on their own runner.

Every piece of model work rank 0's runner does is mirrored by one message, sent just before
rank 0 does it, so every rank enters the same collectives in the same order (the scheduler, the
KV block manager and the sampler live on rank 0 only):

========== ======================================== =========================================
command    payload (int64, host group)              the worker runs
========== ======================================== =========================================
FORWARD    token ids, positions, query starts,      the same eager (or piecewise-graph)
           sequence lengths, block table, slots     forward
LOGITS     (rows broadcast on the device group)     ``compute_logits`` on the same rows
DECODE     ids, starts, slots, block table (async   the same decode-graph bucket
           scheduling: the ids on the device group)
VERIFY     ids, positions, slots, lengths, table    the same verification-graph bucket
COPY       (src, dst) block pairs                   the same KV block copies
STOP       -                                        leaves its loop
========== ======================================== =========================================

A message is a fixed 8-int header (on the idle group: workers wait there between steps) then
one flat int64 payload (on the step group, within ``distributed_timeout_s``): two host
broadcasts per command, a few microseconds each.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch

from layerzero_serve.distributed._group import TPGroup

logger = logging.getLogger("layerzero_serve")

FORWARD, LOGITS, DECODE, VERIFY, COPY, STOP = range(1, 7)
HEADER = 8
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TensorParallelWorkerError(RuntimeError):
    """A tensor-parallel worker died, hung past ``distributed_timeout_s`` or failed a step; the
    engine has torn every rank down and cannot be used any more."""


def _flat(*arrays: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays])


class StepMirror:
    """Rank 0's sender. ``check`` (called before each message) raises
    :class:`TensorParallelWorkerError` when a worker is gone; any failure of a send tears the
    group down through ``on_failure``. Host only (LOGITS also broadcasts on the device)."""

    def __init__(self, group: TPGroup, check: Callable[[], None],
                 on_failure: Callable[[BaseException], None]) -> None:  # fmt: skip
        self.group = group
        self._check = check
        self._on_failure = on_failure
        self._header = torch.zeros(HEADER, dtype=torch.int64)
        self.broken: BaseException | None = None

    def _send(self, cmd: int, fields: tuple[int, ...], payload: np.ndarray | None) -> None:
        if self.broken is not None:
            raise TensorParallelWorkerError(
                f"the tensor-parallel group failed earlier: {self.broken!r}"
            )
        try:
            self._check()
            h = self._header
            h.zero_()
            h[0] = cmd
            size = 0 if payload is None else len(payload)
            h[1 : 1 + len(fields)] = torch.tensor(fields, dtype=torch.int64)
            h[HEADER - 1] = size
            self.group.broadcast_header(h)
            if size:
                self.group.broadcast_host(torch.from_numpy(payload))
        except BaseException as e:
            self.fail(e)
            raise self._error(e) from e

    def _error(self, e: BaseException) -> TensorParallelWorkerError:
        return (
            e
            if isinstance(e, TensorParallelWorkerError)
            else TensorParallelWorkerError(
                f"tensor-parallel step failed ({type(e).__name__}: {e}); every rank was shut down"
            )
        )

    def fail(self, error: BaseException) -> None:
        """Mark the group broken and tear it down (once)."""
        if self.broken is None:
            self.broken = error
            self._on_failure(error)

    def guard(self, fn: Callable, *args):
        """``fn(*args)`` with any collective failure turned into a torn-down group and a
        :class:`TensorParallelWorkerError`."""
        try:
            return fn(*args)
        except Exception as e:
            self.fail(e)
            raise self._error(e) from e

    # ---- commands ------------------------------------------------------------------------
    def forward(self, host) -> None:
        """``host``: the step's ``runner.HostBatch``."""
        n, t = len(host.ends), len(host.tokens)
        w = host.table.shape[1] if host.table.ndim == 2 else 0
        payload = _flat(host.tokens, host.positions, host.qsl, host.ends, host.table,
                        host.slots, host.sample_idx)  # fmt: skip
        self._send(FORWARD, (n, t, w, len(host.sample_idx)), payload)

    def logits(self, hidden: torch.Tensor) -> None:
        """Rows ``hidden [S, H]`` whose logits rank 0 computes next (sent on the device)."""
        code = _FLOAT_DTYPES.index(hidden.dtype)
        self._send(LOGITS, (hidden.shape[0], hidden.shape[1], code), None)
        self.guard(self.group.broadcast_device, hidden.contiguous())

    def decode(self, ids, starts, slots, table: np.ndarray, device_ids=None) -> None:
        """A decode-graph step; ``device_ids`` (int64 on the device, async scheduling's
        launched-ahead inputs) replace ``ids`` and are broadcast on the device group."""
        n = len(ids)
        self._send(DECODE, (n, table.shape[1], int(device_ids is not None)),
                   _flat(ids, starts, slots, table))  # fmt: skip
        if device_ids is not None:
            self.guard(self.group.broadcast_device, device_ids[:n].contiguous())

    def verify(self, ids, positions, slots, seq_lens, table: np.ndarray) -> None:
        n = len(seq_lens)
        fields = (n, table.shape[1], len(ids) // max(n, 1))
        self._send(VERIFY, fields, _flat(ids, positions, slots, seq_lens, table))

    def copy_blocks(self, pairs) -> None:
        self._send(COPY, (len(pairs),), _flat(np.asarray(pairs, dtype=np.int64).reshape(-1)))

    def stop(self) -> None:
        """Tell the workers to leave their loop (no error when they are already gone)."""
        if self.broken is None:
            with contextlib.suppress(TensorParallelWorkerError):
                self._send(STOP, (), None)


def _split(payload: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    out, at = [], 0
    for s in sizes:
        out.append(payload[at : at + s])
        at += s
    return out


@torch.inference_mode()
def serve_steps(runner, group: TPGroup) -> None:
    """A worker's loop: receive rank 0's commands and run them on ``runner`` (this rank's
    ``ModelRunner``) until STOP. Host loop around the runner's (graph) launches."""
    from layerzero_serve.runner import HostBatch, batch_from_host

    header = torch.zeros(HEADER, dtype=torch.int64)
    bs = runner.kv_cache.spec.block_size
    device = runner.device
    while True:
        h = group.broadcast_header(header).tolist()
        cmd, size = h[0], h[HEADER - 1]
        if cmd == STOP:
            return
        p = group.broadcast_host(torch.empty(size, dtype=torch.int64)).numpy() if size else None
        if cmd == FORWARD:
            n, t, w, s = h[1:5]
            tok, pos, qsl, ends, table, slots, sidx = _split(p, [t, t, n + 1, n, n * w, t, s])
            host = HostBatch(tok, pos, qsl, ends, table.reshape(n, w).astype(np.int32),
                             slots, sidx)  # fmt: skip
            runner.forward_batch(batch_from_host(host, bs, device, []))
        elif cmd == LOGITS:
            rows, width, code = h[1:4]
            hidden = torch.empty((rows, width), dtype=_FLOAT_DTYPES[code], device=device)
            runner.model.compute_logits(group.broadcast_device(hidden))
        elif cmd == DECODE:
            n, w, on_device = h[1:4]
            ids, starts, slots, table = _split(p, [n, n, n, n * w])
            table = table.reshape(n, w).astype(np.int32)
            dev_ids = None
            if on_device:  # async scheduling: rank 0's sampled ids, still on its device
                dev_ids = group.broadcast_device(torch.empty(n, dtype=torch.int64, device=device))
            runner.graphs.run(ids, starts, slots, starts + 1, table, device_ids=dev_ids)
        elif cmd == VERIFY:
            n, w, q = h[1:4]
            ids, pos, slots, lens, table = _split(p, [n * q, n * q, n * q, n, n * w])
            runner.verify_graphs.run(ids, pos, slots, lens, table.reshape(n, w).astype(np.int32))
        elif cmd == COPY:
            pairs = p.reshape(-1, 2).tolist()
            runner.kv_cache.copy_blocks([tuple(x) for x in pairs])
        else:  # pragma: no cover - rank 0 sends only the commands above
            raise RuntimeError(f"unknown tensor-parallel command {cmd}")
