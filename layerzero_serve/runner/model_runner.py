"""Executes one scheduled step: inputs -> forward -> logits of sampling rows -> tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from layerzero_serve.kv_cache.storage import KVCache
from layerzero_serve.runner.attention import PagedAttention
from layerzero_serve.runner.input_batch import prepare_batch
from layerzero_serve.sampling import Sampler
from layerzero_serve.types import SchedulerOutput


@dataclass(slots=True)
class StepTimings:
    """Cumulative host wall time per phase, in seconds (GPU phases are synchronised only when
    ``sync`` is set, otherwise device time lands in whichever phase waits for it)."""

    schedule: float = 0.0
    prepare: float = 0.0
    forward: float = 0.0
    sample: float = 0.0
    update: float = 0.0
    steps: int = 0
    sync: bool = False

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("schedule", "prepare", "forward", "sample", "update")}


class ModelRunner:
    """Owns the model, the KV tensors, the attention interface and the sampler."""

    def __init__(
        self, model: torch.nn.Module, kv_cache: KVCache, sampler: Sampler, device: torch.device
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.attn = PagedAttention(kv_cache)
        self.sampler = sampler
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.timings = StepTimings()

    def _sync(self) -> None:
        if self.timings.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[list[int]]:
        """Run the step; returns the sampled token ids of each row (empty when a row does not
        sample: a prefill chunk short of the prompt's end)."""
        tm = self.timings
        t0 = time.perf_counter()
        self.kv_cache.copy_blocks(out.blocks_to_copy)
        batch = prepare_batch(out, self.kv_cache.spec.block_size, self.device)
        self._sync()
        t1 = time.perf_counter()
        hidden = self.model(batch.input_ids, batch.positions, self.attn, batch.meta)
        results: list[list[int]] = [[] for _ in out.requests]
        if batch.sample_rows:
            logits = self.model.compute_logits(hidden[batch.sample_indices])
            self._sync()
            t2 = time.perf_counter()
            reqs = [out.requests[i] for i in batch.sample_rows]
            params = [r.sampling_params for r in reqs]
            gens = [self.generators.get(r.request_id) for r in reqs]
            tokens = self.sampler(logits, params, gens).tolist()
            for row, tok in zip(batch.sample_rows, tokens, strict=True):
                results[row] = [tok]
        else:
            self._sync()
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        tm.prepare += t1 - t0
        tm.forward += t2 - t1
        tm.sample += t3 - t2
        return results
