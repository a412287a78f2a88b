"""Per-request sampling state: a host table of static per-request values and the device tables
that penalties, logit bias, token masks and min-tokens read.

* ``HostTable``: one column entry per live request (``RowState.hidx``), written once at
  admission, so a step gathers every row's parameters with one NumPy fancy index instead of
  reading attributes row by row.
* ``DeviceTables``: ``[slots + 1, V]`` tables indexed by a request's *slot* (row 0 is neutral:
  zero counts, no masks, zero bias), allocated on first use of each feature. Only requests using
  a feature own a slot. The host is the source of truth (the request's tokens): a slot is
  (re)built from it whenever assigned, and output counts are topped up each step from the tokens
  the host appended since, so an evicted slot simply rebuilds later.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from layerzero_serve.kernels.sampling_api import NARROW_TOP_K
from layerzero_serve.sampling._params import SamplingParams

# host float32 columns (also the order of the packed buffer's float block)
F_TEMPERATURE, F_TOP_P, F_MIN_P, F_REPETITION, F_PRESENCE, F_FREQUENCY = range(6)
NUM_F32 = 6
# host int64 columns
I_TOP_K, I_SEED, I_SLOT, I_FLAGS, I_MIN_TOKENS, I_PROMPT_LEN, I_NUM_LOGPROBS = range(7)
NUM_I64 = 7

# per-row flag bits (static ones set at admission; ACTIVE_MIN_TOKENS per step)
GREEDY = 1
SEEDED = 2
FILTERS = 4
PENALTIES = 8
TOKEN_MASK = 16
MIN_TOKENS = 32
LOGPROBS = 64
LOGPROBS_PROCESSED = 128
ACTIVE_MIN_TOKENS = 256
LOGPROBS_RAW = 512
TOP_K = 1024  # a sampled row with top-k < V (FILTERS is TOP_K | TOP_P)
WIDE_TOP_K = 2048  # ... with top-k above sampling_api.NARROW_TOP_K
TOP_P = 4096  # a sampled row with top-p < 1
SLOT_FEATURES = PENALTIES | TOKEN_MASK | MIN_TOKENS


@dataclass(slots=True, eq=False)
class RowState:
    """What the sampler keeps about one request between steps (host only)."""

    hidx: int  # column of the HostTable
    params: SamplingParams
    flags: int
    stop_ids: tuple[int, ...]  # suppressed while min_tokens is not reached
    slot: int = 0  # row of the DeviceTables; 0 = none
    counted: int = 0  # output tokens already added to the slot's counts
    last_step: int = -1  # for LRU eviction of slots


def static_values(
    params: SamplingParams, seed: int, vocab: int, prompt_len: int, seeded: bool
) -> tuple[list[float], list[int], int]:
    """(float32 columns, int64 columns, flags) of one request at admission. ``seeded``: the
    seed came from the user (the batch then needs a position-invariant kernel)."""
    p = params
    greedy = p.is_greedy
    top_k = vocab if (greedy or p.top_k <= 0) else min(p.top_k, vocab)
    flags = GREEDY * greedy | SEEDED * seeded
    flags |= FILTERS * (not greedy and (top_k < vocab or p.top_p < 1.0))
    flags |= TOP_K * (not greedy and top_k < vocab) | TOP_P * (not greedy and p.top_p < 1.0)
    flags |= WIDE_TOP_K * (not greedy and NARROW_TOP_K < top_k < vocab)
    flags |= PENALTIES * p.has_penalties | TOKEN_MASK * p.has_token_mask
    flags |= MIN_TOKENS * (p.min_tokens > 0) | LOGPROBS * (p.logprobs is not None)
    flags |= LOGPROBS_PROCESSED * (p.logprobs is not None and p.logprobs_mode == "processed")
    flags |= LOGPROBS_RAW * (p.logprobs is not None and p.logprobs_mode == "raw")
    f32 = [1.0 if greedy else p.temperature, p.top_p, p.min_p]
    f32 += [p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
    num_lp = -1 if p.logprobs is None else p.logprobs
    i64 = [top_k, seed, 0, flags, p.min_tokens, prompt_len, num_lp]
    return f32, i64, flags


class HostTable:
    """Column-major host arrays ``[NUM_F32, cap]`` / ``[NUM_I64, cap]`` with a free list."""

    def __init__(self, capacity: int = 64) -> None:
        self.f32 = np.zeros((NUM_F32, capacity), np.float32)
        self.i64 = np.zeros((NUM_I64, capacity), np.int64)
        self._free = list(range(capacity - 1, -1, -1))

    def add(self, f32: list[float], i64: list[int]) -> int:
        if not self._free:
            cap = self.f32.shape[1]
            self.f32 = np.concatenate([self.f32, np.zeros_like(self.f32)], axis=1)
            self.i64 = np.concatenate([self.i64, np.zeros_like(self.i64)], axis=1)
            self._free = list(range(2 * cap - 1, cap - 1, -1))
        h = self._free.pop()
        self.f32[:, h] = f32
        self.i64[:, h] = i64
        return h

    def remove(self, hidx: int) -> None:
        self._free.append(hidx)


@dataclass(slots=True)
class DeviceTables:
    """``[slots + 1, V]`` device tables (row 0 neutral), each allocated on first use.

    counts: int32 output-token counts (penalties); prompt: bool prompt-token mask (repetition
    penalty); bias: float32 additive row (logit bias, ``-inf`` for banned / not-allowed ids);
    stop: bool EOS/stop ids (min-tokens). ``take``/``give`` hand slots out and back.
    """

    num_slots: int
    vocab: int
    device: torch.device
    counts: torch.Tensor | None = None
    prompt: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    stop: torch.Tensor | None = None
    _free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._free = list(range(self.num_slots, 0, -1))

    def ensure(self, flags: int) -> None:
        """Allocate the tables the features in ``flags`` need (outside any graph)."""
        shape, dev = (self.num_slots + 1, self.vocab), self.device
        if flags & PENALTIES and self.counts is None:
            self.counts = torch.zeros(shape, dtype=torch.int32, device=dev)
            self.prompt = torch.zeros(shape, dtype=torch.bool, device=dev)
        if flags & TOKEN_MASK and self.bias is None:
            self.bias = torch.zeros(shape, dtype=torch.float32, device=dev)
        if flags & MIN_TOKENS and self.stop is None:
            self.stop = torch.zeros(shape, dtype=torch.bool, device=dev)

    def take(self) -> int | None:
        return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        if slot:
            self._free.append(slot)

    def grow(self, num_slots: int) -> None:
        """More slots (eager use with batches larger than the capacity; never in graph mode:
        captured graphs hold the old tables)."""
        extra = num_slots - self.num_slots
        for name in ("counts", "prompt", "bias", "stop"):
            t = getattr(self, name)
            if t is not None:
                pad = torch.zeros((extra, self.vocab), dtype=t.dtype, device=t.device)
                setattr(self, name, torch.cat([t, pad]))
        self._free = list(range(num_slots, self.num_slots, -1)) + self._free
        self.num_slots = num_slots
