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

**Measured kernel per (bucket, plan).** Which sampling kernel is fastest depends on the batch
and the plan (on an H200 at batch 1 the project's Triton kernel adds 0.03 ms over greedy for
top-p 0.9 where FlashInfer adds 0.15; at batch 64 FlashInfer's 0.40 ms beats its 1.22). So when
a plan is captured, every candidate of ``Sampler.kernel_candidates(plan)`` is warmed up,
captured and timed over a few replays on the live logits, and the fastest graph is kept (the
others are reset); the per-row offsets are restored afterwards, so the step draws exactly as
without the measurement. Every candidate samples the same distribution (they are chosen among
exact kernels), so the choice changes which kernel draws, never what is drawn from.
``choices`` keeps the times; the log says what won.
"""

from __future__ import annotations

import logging
import statistics

import torch

from layerzero_serve.sampling import DeviceSample, HostSample, Sampler, SamplingBatch, SamplingPlan

logger = logging.getLogger("layerzero_serve")
MEASURE_WARMUP, MEASURE_REPS = 2, 9  # replays per candidate kernel when a plan is captured


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

    def __init__(self, sampler: Sampler, logits: torch.Tensor, measure: bool = True) -> None:
        self.sampler = sampler
        self.logits = logits
        self.measure = measure  # time every candidate kernel per (bucket, plan)
        self.choices: dict[tuple[int, SamplingPlan], dict[str, float]] = {}  # ms per replay
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
        kernels = self.sampler.kernel_candidates(batch.plan) if self.measure else [None]
        if len(kernels) == 1:
            graph, out = self._record(key[0], batch, kernels[0])
            self._graphs[key] = (graph, out)
            logger.debug("captured a sampler graph for bucket %d, plan %s", key[0], key[1])
            return graph, out
        offset = batch.offset.clone()  # every timed replay advances it: restored below
        best, times = None, {}
        for kernel in kernels:
            try:
                self.sampler.sample(self.logits[: key[0]], batch, kernel)  # warm-up, eager
                graph, out = self._record(key[0], batch, kernel)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot be captured
                logger.warning("sampling kernel %s not captured: %r", kernel.name, e)
                continue
            if out.drawn_by is not kernel:  # it failed and another one drew: not its time
                graph.reset()
                continue
            times[kernel.name] = ms = _replay_ms(graph)
            if best is None or ms < best[0]:
                if best is not None:
                    best[1].reset()
                best = (ms, graph, out)
            else:
                graph.reset()
        batch.offset.copy_(offset)
        if best is None:  # every candidate failed over: eager this step, capture again later
            return None
        self._graphs[key] = best[1:]
        self.choices[key] = times
        logger.info(
            "sampler graph for bucket %d, plan %s: %s (%s)", key[0], key[1],
            best[2].drawn_by.name, ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()),
        )  # fmt: skip
        return best[1:]

    def _record(self, bucket: int, batch: SamplingBatch, kernel):
        graph = torch.cuda.CUDAGraph()
        # Capture on a side stream (torch.cuda.graph does), then replay for this step: the
        # capture itself runs nothing. ``sample`` advances ``offset`` inside the graph; the
        # next prepare() rewrites it, so the replay below uses this step's offsets.
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.sampler.sample(self.logits[:bucket], batch, kernel)
        return graph, out


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    """Median ms of one replay (after ``MEASURE_WARMUP`` untimed ones)."""
    for _ in range(MEASURE_WARMUP):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(MEASURE_REPS)]  # fmt: skip
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    events[-1][1].synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def first_rows(res: HostSample, n: int) -> HostSample:
    """The results of the first ``n`` rows (the rest are a bucket's padding)."""
    if len(res.tokens) == n:
        return res
    failed = {i: d for i, d in res.failed.items() if i < n}
    return HostSample(res.tokens[:n], failed, res.logprobs[:n], res.drawn_by)
