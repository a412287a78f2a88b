"""Speculative decoding building blocks: draft proposers, lossless verification (rejection
sampling), acceptance metrics and the adaptive choice of the number of drafts.

* :class:`Proposer` / :class:`NgramProposer`: up to ``k`` draft ids per request on the host.
* :func:`rejection_sample` (torch reference) and the Triton kernel
  ``layerzero_serve.kernels._triton.rejection_sampling``: verify ``[B, k]`` drafts against the
  target's ``[B, k+1, V]`` distributions, CUDA-graph safe; :func:`draw_randoms` makes their
  random inputs; :func:`greedy_verify` for argmax-only greedy batches.
* :class:`SpecDecodeMetrics`: acceptance counts, per position and per request.
* :class:`AdaptiveK`: ``k`` per step from the batch size and the measured acceptance rate.
"""

from __future__ import annotations

from layerzero_serve.spec_decode._adaptive import (
    AdaptiveK,
    LinearStepCost,
    StepCostModel,
    TableStepCost,
    expected_speedup,
    expected_tokens,
)
from layerzero_serve.spec_decode._coordinator import SpecCoordinator
from layerzero_serve.spec_decode._metrics import RequestSpecStats, SpecDecodeMetrics
from layerzero_serve.spec_decode._ngram import NgramProposer, find_ngram_match
from layerzero_serve.spec_decode._ngram_index import NgramIndex
from layerzero_serve.spec_decode._proposer import MAX_K, Proposer
from layerzero_serve.spec_decode._rejection import (
    TorchRejectionSampler,
    draw_randoms,
    greedy_verify,
    rejection_sample,
)

__all__ = [
    "AdaptiveK",
    "LinearStepCost",
    "MAX_K",
    "NgramIndex",
    "NgramProposer",
    "Proposer",
    "RequestSpecStats",
    "SpecCoordinator",
    "SpecDecodeMetrics",
    "StepCostModel",
    "TableStepCost",
    "TorchRejectionSampler",
    "draw_randoms",
    "expected_speedup",
    "expected_tokens",
    "find_ngram_match",
    "greedy_verify",
    "rejection_sample",
]
