"""What ``sample()`` returns: device tensors packed for ONE device-to-host copy per step
(tokens, failure flags and, when asked, logprobs), and their host-side unpacking.

Packed layout, one row per sequence: without logprobs int64 ``[B, 2]`` = (token, flag); with
logprobs float64 ``[B, 4 + 2n]`` = (token, flag, logprob of the token, its rank, n top ids,
n top logprobs). float64 holds token ids (< 2^53) and float32 logprobs exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from layerzero_serve.kernels.sampling_api import filter_weights
from layerzero_serve.sampling._batch import SamplingBatch
from layerzero_serve.sampling._processors import FAILURE_DETAILS
from layerzero_serve.sampling._state import GREEDY, LOGPROBS_PROCESSED
from layerzero_serve.types import TokenLogprob


def processed_logprobs(
    x: torch.Tensor, probs: torch.Tensor | None, batch: SamplingBatch
) -> torch.Tensor:
    """float32 ``[B, V]``: log of the distribution each row is sampled from (filters applied,
    renormalised, ``-inf`` outside the kept set); greedy rows: log-softmax of the processed
    logits ``x``. Graph-safe."""
    greedy_lp = torch.log_softmax(x, dim=-1)
    if probs is None:  # all greedy
        return greedy_lp
    w = filter_weights(probs, batch.top_k.to(torch.int32), batch.top_p, batch.min_p)
    sampled_lp = torch.log(w / w.sum(dim=-1, keepdim=True))
    greedy = ((batch.flags & GREEDY) != 0).unsqueeze(-1)
    return torch.where(greedy, greedy_lp, sampled_lp)


def pack(
    tokens: torch.Tensor,
    flags: torch.Tensor,
    raw: torch.Tensor,
    x: torch.Tensor,
    probs: torch.Tensor | None,
    batch: SamplingBatch,
) -> torch.Tensor:
    """The packed device tensor (see the module docstring). Graph-safe."""
    plan = batch.plan
    n = plan.num_top_logprobs
    if n < 0:
        return torch.stack([tokens, flags], dim=1)
    lp_raw = torch.log_softmax(raw, dim=-1) if plan.raw_logprobs else None
    lp_proc = processed_logprobs(x, probs, batch) if plan.processed_logprobs else None
    if lp_raw is None:
        lp = lp_proc
    elif lp_proc is None:
        lp = lp_raw
    else:
        proc_rows = ((batch.flags & LOGPROBS_PROCESSED) != 0).unsqueeze(-1)
        lp = torch.where(proc_rows, lp_proc, lp_raw)
    tok_lp = lp.gather(1, tokens.unsqueeze(-1))
    rank = (lp > tok_lp).sum(dim=-1, keepdim=True) + 1
    cols = [tokens.unsqueeze(-1), flags.unsqueeze(-1), tok_lp, rank]
    if n > 0:
        top_lp, top_ids = lp.topk(n, dim=-1)
        cols += [top_ids, top_lp]
    return torch.cat([c.to(torch.float64) for c in cols], dim=1)


@dataclass(slots=True)
class HostSample:
    """A step's results on the host.

    tokens: one id per row (0 for a failed row); failed: row -> detail for rows whose logits
    were degenerate (their request must fail; the other rows are unaffected); logprobs: per row,
    a TokenLogprob when the row asked for logprobs, else None; drawn_by: the sampling kernel
    that drew the sampled rows (None: the sampler's choice for the plan), whom an
    out-of-vocabulary id is blamed on.
    """

    tokens: list[int]
    failed: dict[int, str] = field(default_factory=dict)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    drawn_by: object = None


@dataclass(slots=True)
class DeviceSample:
    """``sample()``'s device results. ``tokens`` int64 ``[B]`` and ``flags`` int64 ``[B]`` can
    be read on the device (graph outputs); ``to_host()`` makes the step's one D2H copy."""

    tokens: torch.Tensor
    flags: torch.Tensor
    packed: torch.Tensor
    num_logprobs: np.ndarray  # host, per row (-1 = none)
    drawn_by: object = None  # the kernel that drew (see HostSample)

    def to_host(self) -> HostSample:
        # the step's single device -> host copy (synchronises)
        return _parse(self.packed.cpu().numpy(), self.num_logprobs, self.drawn_by)

    def to_host_async(self) -> PendingHostSample:
        """Start the device -> host copy into pinned memory and return at once (CUDA); read it
        with ``result()``. Enqueue it before any later step's work that rewrites ``packed``
        (a captured sampler graph's static output)."""
        if self.packed.device.type != "cuda":
            return PendingHostSample(self.packed, None, self.num_logprobs, self.drawn_by)
        host = torch.empty(self.packed.shape, dtype=self.packed.dtype, pin_memory=True)
        host.copy_(self.packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingHostSample(host, done, self.num_logprobs, self.drawn_by)


@dataclass(slots=True)
class PendingHostSample:
    """A device -> host copy of a step's packed results in flight (``DeviceSample``)."""

    host: torch.Tensor
    done: torch.cuda.Event | None
    num_logprobs: np.ndarray
    drawn_by: object = None

    def result(self) -> HostSample:
        """Wait for the copy and unpack it."""
        if self.done is not None:
            self.done.synchronize()
        return _parse(self.host.numpy(), self.num_logprobs, self.drawn_by)


def _parse(arr: np.ndarray, num_logprobs: np.ndarray, drawn_by: object = None) -> HostSample:
    """HostSample from the packed host array ``[B, 2 (+ 2 + 2 n)]`` (see the module docstring)."""
    num_rows = arr.shape[0]
    tokens = arr[:, 0].astype(np.int64).tolist()
    flags = arr[:, 1].astype(np.int64)
    failed = {int(i): FAILURE_DETAILS[int(flags[i])] for i in np.flatnonzero(flags)}
    logprobs: list[TokenLogprob | None] = [None] * num_rows
    if arr.shape[1] > 2:
        width = (arr.shape[1] - 4) // 2
        for i in np.flatnonzero(num_logprobs >= 0).tolist():
            n = int(num_logprobs[i])
            logprobs[i] = TokenLogprob(
                token_id=tokens[i],
                logprob=float(arr[i, 2]),
                rank=int(arr[i, 3]),
                top_token_ids=arr[i, 4 : 4 + n].astype(np.int64).tolist(),
                top_logprobs=arr[i, 4 + width : 4 + width + n].tolist(),
            )
    return HostSample(tokens, failed, logprobs, drawn_by)
