"""CUDA graphs of the sampler, one per (batch bucket, sampling plan), replayed right after the
decode graph of that bucket.

Eager sampling of a decode step is ~20 small kernels whose launch cost (a few hundred
microseconds of host time per step on an H200) is paid while the GPU idles. ``Sampler.sample``
is graph-safe by design: it branches only on the host ``SamplingPlan`` and reads its per-row
parameters from a persistent device buffer that ``prepare()`` refills every step. So a graph
captured for a (bucket, plan) replays correctly for every later batch padded to that bucket with
an equal plan, and draws fresh numbers because ``prepare`` writes each row's (seed, offset).

Only plans whose state lives entirely in that persistent buffer are captured: greedy, sampled
with temperature / top-k / top-p / min-p, seeded. Plans that read the sampler's growable tables
(penalties, logit bias / allowed / bad ids, min-tokens) or return logprobs run eagerly, since a
table may be reallocated between steps.

A plan is captured the second time it is seen (the first, eager run warms up lazily compiled
kernels). Every sampler graph shares one memory pool of its own: they replay one at a time and
their outputs are read before the next replay, so their temporaries may alias.
"""

from __future__ import annotations

import logging

import torch

from layerzero_serve.sampling import DeviceSample, HostSample, Sampler, SamplingBatch, SamplingPlan

logger = logging.getLogger("layerzero_serve")


def capturable(plan: SamplingPlan) -> bool:
    """Whether ``sample()`` under ``plan`` reads only the persistent per-row buffer."""
    return not (plan.penalties or plan.token_mask or plan.min_tokens or plan.num_top_logprobs >= 0)


class SamplerGraphs:
    """Captured ``Sampler.sample`` per (bucket, plan) over the decode graphs' logits buffer.

    Args:
        sampler: the engine's sampler (bound to the CUDA device).
        logits: float32 ``[max_batch, vocab]``, the decode graphs' static output (outside any
            graph pool, so its address never changes).
    """

    def __init__(self, sampler: Sampler, logits: torch.Tensor) -> None:
        self.sampler = sampler
        self.logits = logits
        self._pool = None
        self._graphs: dict[tuple[int, SamplingPlan], tuple[torch.cuda.CUDAGraph, DeviceSample]]
        self._graphs = {}
        self._seen: set[tuple[int, SamplingPlan]] = set()

    def __len__(self) -> int:
        return len(self._graphs)

    def sample(self, requests: list, bucket: int) -> HostSample:
        """Sample the first ``len(requests)`` rows of ``logits[:bucket]`` (the rest is the
        bucket's padding). Host results for the real rows only."""
        return first_rows(self.launch(requests, bucket).to_host(), len(requests))

    def launch(self, requests: list, bucket: int, ahead: int = 0) -> DeviceSample:
        """Enqueue the sampling of ``logits[:bucket]`` for ``requests`` (graph replay, or eager
        kernels the first time a plan is seen) without waiting; device results of all
        ``bucket`` rows. ``ahead``: see ``Sampler.prepare``."""
        batch = self.sampler.prepare(requests, pad_to=bucket, ahead=ahead)
        key = (bucket, batch.plan)
        entry = self._graphs.get(key)
        if entry is None and key in self._seen and capturable(batch.plan):
            entry = self._capture(key, batch)
        if entry is None:
            self._seen.add(key)
            return self.sampler.sample(self.logits[:bucket], batch)
        graph, out = entry
        graph.replay()
        return out

    @torch.inference_mode()
    def _capture(self, key, batch: SamplingBatch):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # Capture on a side stream (torch.cuda.graph does), then replay for this step: the
        # capture itself runs nothing. ``sample`` advances ``offset`` inside the graph; the
        # next prepare() rewrites it, so the replay below uses this step's offsets.
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.sampler.sample(self.logits[: key[0]], batch)
        self._graphs[key] = (graph, out)
        logger.debug("captured a sampler graph for bucket %d, plan %s", key[0], key[1])
        return graph, out


def first_rows(res: HostSample, n: int) -> HostSample:
    """The results of the first ``n`` rows (the rest are a bucket's padding)."""
    if len(res.tokens) == n:
        return res
    failed = {i: d for i, d in res.failed.items() if i < n}
    return HostSample(res.tokens[:n], failed, res.logprobs[:n])
