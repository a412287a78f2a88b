"""Speculative decoding metrics: how many drafts were verified and how many of their tokens
were accepted, in aggregate, per draft position and per request.

One *draft* is one request's drafts in one verification step (counted when it has at least one
token). Each update takes the step's ``num_drafts`` and ``num_accepted`` arrays (numpy, lists or
CPU tensors; the caller copies device tensors once per step) and costs a few numpy operations,
plus a dictionary update per row when per-request tracking is asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from layerzero_serve.errors import ValidationError
from layerzero_serve.spec_decode._proposer import MAX_K, check_int

__all__ = ["RequestSpecStats", "SpecDecodeMetrics"]


@dataclass(slots=True)
class RequestSpecStats:
    """Counts of one request (or of everything, in :attr:`SpecDecodeMetrics.total`)."""

    num_drafts: int = 0  # verification steps that carried >= 1 draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens (0.0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted tokens per draft (0.0 before any draft). Each verification also emits one
        recovered or bonus token, so tokens per step are ``1 + mean_accepted_length``."""
        return self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpecDecodeMetrics:
    """Aggregate, per-position and (optionally) per-request acceptance counts.

    Args:
        k_max: largest number of drafts per request and step (sizes the per-position arrays).

    CUDA graphs: host only.
    """

    def __init__(self, k_max: int) -> None:
        self.k_max = check_int("k_max", k_max, 1, MAX_K)
        self.total = RequestSpecStats()
        self.drafted_per_position = np.zeros(self.k_max, dtype=np.int64)
        self.accepted_per_position = np.zeros(self.k_max, dtype=np.int64)
        self._requests: dict[str, RequestSpecStats] = {}

    def update(
        self,
        num_drafts: Sequence[int] | np.ndarray,
        num_accepted: Sequence[int] | np.ndarray,
        request_ids: Sequence[str] | None = None,
    ) -> None:
        """Record one verification step.

        Args:
            num_drafts: ``[B]`` drafts per row, in ``[0, k_max]`` (0 = no speculation).
            num_accepted: ``[B]`` accepted drafts per row, in ``[0, num_drafts]``.
            request_ids: ``B`` ids to also count per request, or None.
        """
        drafts = np.asarray(num_drafts, dtype=np.int64).reshape(-1)
        accepted = np.asarray(num_accepted, dtype=np.int64).reshape(-1)
        if accepted.shape != drafts.shape:
            raise ValidationError("num_accepted", accepted.shape, f"shape {drafts.shape}")
        if drafts.size and (drafts.min() < 0 or drafts.max() > self.k_max):
            raise ValidationError("num_drafts", drafts.tolist(), f"ints in [0, {self.k_max}]")
        if drafts.size and (accepted.min() < 0 or (accepted > drafts).any()):
            raise ValidationError("num_accepted", accepted.tolist(), "ints in [0, num_drafts]")
        if request_ids is not None and len(request_ids) != drafts.size:
            raise ValidationError("request_ids", len(request_ids), f"{drafts.size} ids")

        self.total.num_drafts += int(np.count_nonzero(drafts))
        self.total.num_draft_tokens += int(drafts.sum())
        self.total.num_accepted_tokens += int(accepted.sum())
        # Rows with d drafts offered positions 0..d-1: the count at position j is #(d > j), a
        # reversed cumulative sum of the histogram of d (likewise for accepted).
        for counts, values in (
            (self.drafted_per_position, drafts),
            (self.accepted_per_position, accepted),
        ):
            hist = np.bincount(values, minlength=self.k_max + 1)
            counts += np.cumsum(hist[::-1])[::-1][1:]
        if request_ids is not None:
            for rid, d, a in zip(request_ids, drafts.tolist(), accepted.tolist(), strict=True):
                if d:
                    st = self._requests.get(rid)
                    if st is None:
                        st = self._requests[rid] = RequestSpecStats()
                    st.num_drafts += 1
                    st.num_draft_tokens += d
                    st.num_accepted_tokens += a

    @property
    def acceptance_rate(self) -> float:
        return self.total.acceptance_rate

    @property
    def mean_accepted_length(self) -> float:
        return self.total.mean_accepted_length

    def acceptance_rate_per_position(self) -> np.ndarray:
        """float64 ``[k_max]``: accepted / drafted at each draft position (NaN where nothing
        was drafted). Position j counts a draft token as accepted only if 0..j all were."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.accepted_per_position / self.drafted_per_position

    def request(self, request_id: str) -> RequestSpecStats | None:
        """Counts of one request, or None if it has not been verified with drafts."""
        return self._requests.get(request_id)

    def pop_request(self, request_id: str) -> RequestSpecStats | None:
        """Remove and return a request's counts (call when it finishes)."""
        return self._requests.pop(request_id, None)
