"""The runner's half of async scheduling: a pure decode step enqueued through the captured
decode and sampler graphs without waiting for its tokens (:func:`launch_decode`), and its tokens
read back later (:func:`collect_decode`).

A step launched with ``prev`` (the previous step, still on the device) takes its input ids from
``prev``'s sampled tokens by a device-to-device copy, so it can be enqueued before the host has
seen them: the host then reads ``prev``'s tokens, updates the requests and schedules while the
GPU computes. Ordering on the one stream makes it safe: the copy of ``prev``'s packed results to
pinned host memory is enqueued by ``prev``'s launch, before this step's sampler graph rewrites
its static outputs; every pinned staging buffer is rewritten only after an event says the copy
out of it ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from layerzero_serve.runner._sampler_graphs import first_rows
from layerzero_serve.sampling import PendingHostSample
from layerzero_serve.types import SchedulerOutput, StepTokens


@dataclass(slots=True)
class PendingDecode:
    """A launched decode step: its schedule, its sampled ids on the device (int64
    ``[bucket]``, the next step's inputs) and the copy of its results to the host in flight."""

    out: SchedulerOutput
    tokens: torch.Tensor
    host: PendingHostSample


def launch_decode(runner, out: SchedulerOutput, prev: PendingDecode | None = None):
    """Enqueue ``out`` (every row: one decode token) through the graphs; returns a
    :class:`PendingDecode`, or None when the step does not fit the graphs (run it with
    ``execute``). With ``prev`` the input ids are ``prev``'s tokens (device) and every request
    is one token ahead of its host state. No host sync."""
    g, sampler_graphs = runner.graphs, runner.sampler_graphs
    n = len(out.requests)
    if g is None or sampler_graphs is None or not 0 < n <= g.max_batch:
        return None
    t0 = time.perf_counter()
    runner.copy_blocks(out.blocks_to_copy)
    ids, starts, slots, table = runner.decode_inputs(out, ids_known=prev is None)
    device_ids = None if prev is None else prev.tokens
    if runner.mirror is not None:  # tensor parallelism: the workers replay the same bucket,
        runner.mirror.decode(ids, starts, slots, table, device_ids)  # ids on the device
    g.run(ids, starts, slots, starts + 1, table, device_ids=device_ids)
    sample = sampler_graphs.launch(out.requests, g.bucket_for(n), ahead=int(prev is not None))
    pending = PendingDecode(out, sample.tokens, sample.to_host_async())
    runner.timings.prepare += time.perf_counter() - t0
    return pending


def collect_decode(runner, pending: PendingDecode) -> StepTokens:
    """Wait for a launched step's tokens; one per row (none for a row whose sampling failed,
    which ``failed`` reports)."""
    t0 = time.perf_counter()
    res = first_rows(pending.host.result(), len(pending.out.requests))
    # ids outside the vocabulary from a plug-in sampler: its rows fail; blame it for later steps
    runner.check_sampling_kernel(res, pending.out.requests)
    results = StepTokens([tok] for tok in res.tokens)
    for row, detail in res.failed.items():
        results[row].clear()
        results.failed[row] = detail
    runner.timings.sample += time.perf_counter() - t0
    return results
