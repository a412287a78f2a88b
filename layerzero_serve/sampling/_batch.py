"""A step's sampling inputs on the device: the plan (host flags), the per-row parameter tensors,
and the packed staging buffer they travel in.

Layout of the packed buffer (bytes): ``[float32 block [6, R] | int64 block [5, R] | tail]``.
The fixed blocks hold one column per row (field-major, so every field of rows ``[:B]`` is a
contiguous view); the tail carries the step's table updates (slot resets, new output tokens,
bias entries...) as int64 sections. Per step: the host fills a pinned buffer, ONE host-to-device
copy moves ``[fixed | tail]`` into a device staging buffer, and a device-to-device copy moves
the fixed part into the *persistent* buffer whose views ``SamplingBatch`` exposes. The
persistent buffer never moves (``R`` rows, the sampler's capacity), so a CUDA graph that
captured ``sample()`` reads each step's parameters on replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from layerzero_serve.kernels.sampling_api import SamplingHints
from layerzero_serve.sampling import _state as st

# int64 block rows of the packed buffer
P_TOP_K, P_SEED, P_OFFSET, P_SLOT, P_FLAGS = range(5)
NUM_PACKED_I64 = 5


@dataclass(frozen=True, slots=True)
class SamplingPlan:
    """Which stages ``sample()`` runs for a batch (decided on the host by ``prepare``).

    ``sample()`` branches only on these host values, so a CUDA graph captured for a plan is
    valid for every batch with an equal plan; ``a.union(b)`` covers both (pass it to
    ``prepare(plan_floor=...)`` to make small batches use a captured plan).
    """

    all_greedy: bool = True  # argmax fast path
    any_greedy: bool = False
    filters: bool = False  # some sampled row has top-k < V or top-p < 1
    top_k: bool = False  # ... has top-k < V
    wide_top_k: bool = False  # ... has top-k in (sampling_api.NARROW_TOP_K, V)
    top_p: bool = False  # ... has top-p < 1
    penalties: bool = False
    token_mask: bool = False  # logit bias / allowed / bad ids
    min_tokens: bool = False  # some row still suppresses EOS / stop ids this step
    invariant: bool = False  # a seeded row: use a position-invariant kernel
    num_top_logprobs: int = -1  # -1: no logprobs; else top-n columns (max over rows)
    raw_logprobs: bool = False
    processed_logprobs: bool = False

    @staticmethod
    def from_flags(flags: np.ndarray, num_logprobs: np.ndarray) -> SamplingPlan:
        """From per-row flag bits (``state.GREEDY``...) and requested top-n (-1 none): two
        reductions over the rows, the rest on Python ints."""
        if len(flags) == 0:
            return SamplingPlan()
        any_ = int(np.bitwise_or.reduce(flags))
        all_ = int(np.bitwise_and.reduce(flags))
        return SamplingPlan(
            all_greedy=bool(all_ & st.GREEDY),
            any_greedy=bool(any_ & st.GREEDY),
            filters=bool(any_ & st.FILTERS),
            top_k=bool(any_ & st.TOP_K),
            wide_top_k=bool(any_ & st.WIDE_TOP_K),
            top_p=bool(any_ & st.TOP_P),
            penalties=bool(any_ & st.PENALTIES),
            token_mask=bool(any_ & st.TOKEN_MASK),
            min_tokens=bool(any_ & st.ACTIVE_MIN_TOKENS),
            invariant=bool(any_ & st.SEEDED),
            num_top_logprobs=int(num_logprobs.max()) if any_ & st.LOGPROBS else -1,
            raw_logprobs=bool(any_ & st.LOGPROBS_RAW),
            processed_logprobs=bool(any_ & st.LOGPROBS_PROCESSED),
        )

    def hints(self) -> SamplingHints:
        """The launch hints a kernel that ``takes_hints`` gets for batches of this plan."""
        return SamplingHints(self.top_k, self.wide_top_k, self.top_p, self.any_greedy)

    def union(self, other: SamplingPlan) -> SamplingPlan:
        return SamplingPlan(
            all_greedy=self.all_greedy and other.all_greedy,
            any_greedy=self.any_greedy or other.any_greedy,
            filters=self.filters or other.filters,
            top_k=self.top_k or other.top_k,
            wide_top_k=self.wide_top_k or other.wide_top_k,
            top_p=self.top_p or other.top_p,
            penalties=self.penalties or other.penalties,
            token_mask=self.token_mask or other.token_mask,
            min_tokens=self.min_tokens or other.min_tokens,
            invariant=self.invariant or other.invariant,
            num_top_logprobs=max(self.num_top_logprobs, other.num_top_logprobs),
            raw_logprobs=self.raw_logprobs or other.raw_logprobs,
            processed_logprobs=self.processed_logprobs or other.processed_logprobs,
        )


@dataclass(slots=True)
class SamplingBatch:
    """One step's per-row parameters: device views ``[B]`` of the persistent buffer.

    float32: temperature (1 for greedy rows), top_p, min_p, repetition / presence / frequency
    penalties. int64: top_k (in [1, V]), seed, offset (the row's output length: its draw
    counter), slot (row of the sampler's device tables, 0 = none), flags (``state`` bits).
    ``num_logprobs`` is a host array (-1 = no logprobs for the row). The tensor fields are in
    the packed buffer's column order (``state.F_*`` then ``P_*``).
    """

    num_rows: int
    plan: SamplingPlan
    temperature: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition: torch.Tensor
    presence: torch.Tensor
    frequency: torch.Tensor
    top_k: torch.Tensor
    seed: torch.Tensor
    offset: torch.Tensor
    slot: torch.Tensor
    flags: torch.Tensor
    num_logprobs: np.ndarray


class PackedStaging:
    """The pinned host buffer, the device staging buffer and the persistent device buffer."""

    def __init__(self, rows: int, device: torch.device, tail_bytes: int = 1 << 16) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.rows = rows
        self.f32_bytes = st.NUM_F32 * rows * 4  # a multiple of 8: the int64 block stays aligned
        self.fixed = self.f32_bytes + NUM_PACKED_I64 * rows * 8
        self.persist = torch.zeros(self.fixed, dtype=torch.uint8, device=device)
        d_f32 = self.persist[: self.f32_bytes].view(torch.float32).view(st.NUM_F32, rows)
        d_i64 = self.persist[self.f32_bytes :].view(torch.int64).view(NUM_PACKED_I64, rows)
        self.d_f32, self.d_i64 = d_f32, d_i64
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}
        self._event = torch.cuda.Event() if self.cuda else None
        self._alloc(tail_bytes)

    def _alloc(self, tail_bytes: int) -> None:
        size = self.fixed + tail_bytes
        self.host = torch.zeros(size, dtype=torch.uint8, pin_memory=self.cuda)
        raw = self.host.numpy()
        self.h_f32 = raw[: self.f32_bytes].view(np.float32).reshape(st.NUM_F32, self.rows)
        self.h_i64 = raw[self.f32_bytes : self.fixed].view(np.int64).reshape(NUM_PACKED_I64, -1)
        self.h_tail = raw[self.fixed :].view(np.int64)
        self.staging = (
            torch.empty(size, dtype=torch.uint8, device=self.device) if self.cuda else self.host
        )

    def begin(self, tail_len: int) -> None:
        """Make the host buffer writable for a step with ``tail_len`` int64 tail entries: wait
        for the previous step's copy out of it, grow the tail if needed. (With async
        scheduling that copy is queued behind the previous step's forward, so this waits for
        it; the GPU stays busy, since the next forward is already queued.)"""
        if self._event is not None:
            self._event.synchronize()
        if tail_len > len(self.h_tail):
            self._alloc(max(2 * tail_len, 2 * len(self.h_tail)) * 8)

    def upload(self, tail_len: int) -> torch.Tensor:
        """One copy host -> device of ``[fixed | tail[:tail_len]]``, then the fixed part into
        the persistent buffer (device to device). Returns the device tail (int64)."""
        n = self.fixed + 8 * tail_len
        if self.cuda:
            self.staging[:n].copy_(self.host[:n], non_blocking=True)
            self._event.record()
        self.persist.copy_(self.staging[: self.fixed], non_blocking=self.cuda)
        return self.staging[self.fixed : n].view(torch.int64)

    def batch(self, num_rows: int, plan: SamplingPlan, num_logprobs: np.ndarray) -> SamplingBatch:
        views = self._views.get(num_rows)
        if views is None:  # made once per row count: the same tensors every step (graphs)
            f, i, b = self.d_f32, self.d_i64, num_rows
            views = tuple(f[c, :b] for c in range(st.NUM_F32))
            views += tuple(i[c, :b] for c in range(NUM_PACKED_I64))
            self._views[num_rows] = views
        return SamplingBatch(num_rows, plan, *views, num_logprobs)
