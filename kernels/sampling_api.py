"""The ``Op.SAMPLING`` kernel contract, the counter-based random numbers every position-invariant
kernel shares, and the torch reference kernel (always available, CPU and GPU, graph-safe).

A sampling kernel draws one token per row from an already processed distribution (temperature,
penalties, bias and masks applied by the sampler) after the top-k -> top-p -> min-p filters.

**Filter semantics** (every kernel): tokens are ranked by descending probability, lower token id
first among equal probabilities (the tie rule). top-k keeps the first ``k`` of the ranking;
top-p keeps, on the distribution renormalised over the top-k set, every token whose mass
*before* it in the ranking is ``< top_p`` (so the most likely token always stays); min-p keeps
tokens with ``p >= min_p * p_max``; tokens with ``p == 0`` are never drawn. The draw is from the
kept tokens renormalised.

**Random numbers.** A position-invariant kernel draws with one uniform per row,
``counter_uniform(seed, offset)``: splitmix64 applied to ``splitmix64(seed) + (offset + 1) *
golden``, top 24 bits as a float32 in [0, 1). It depends on the row's (seed, offset) only, never
on the row index or the batch, and is computed on the device with int64 arithmetic (no
generator state, so it can live in a CUDA graph). The draw is an inverse CDF over the kept
weights in **token-id order**, so the torch and Triton kernels pick the same token for the same
(seed, offset) up to float summation order at a CDF boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "NARROW_TOP_K",
    "SamplingHints",
    "SamplingKernel",
    "TorchSamplingKernel",
    "counter_uniform",
    "draw_inverse_cdf",
    "draw_unfiltered",
    "filter_weights",
    "mix64",
]

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic; int64 wraps the same).
GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
MIX2 = 0x94D049BB133111EB - (1 << 64)
UNIFORM_BITS = 24  # a float32 mantissa: every value k / 2^24 is exact
# Launch hints (``SamplingHints``): top-k values up to this are "narrow" (kernels that keep a
# fixed number of candidates per row decide them without a search of the vocabulary)
NARROW_TOP_K = 256


class SamplingKernel(Protocol):
    """An ``Op.SAMPLING`` kernel: draws one token per row of already processed probabilities
    (see :meth:`sample`); graph-safe. ``position_invariant`` says whether a seeded row's draw is
    independent of its batch position.

    CUDA graphs: ``sample`` is graph-safe: no host sync, shapes fixed by its inputs.
    """

    name: str
    position_invariant: bool  # True: a seeded row draws the same token at any batch position

    def sample(
        self,
        probs: torch.Tensor,
        top_k: torch.Tensor,
        top_p: torch.Tensor,
        min_p: torch.Tensor,
        seed: torch.Tensor,
        offset: torch.Tensor,
    ) -> torch.Tensor:
        """One token per row.

        Args:
            probs: float32 ``[B, V]``, rows sum to 1 (temperature, penalties, bias, masks
                already applied).
            top_k: int32 ``[B]`` in ``[1, V]`` (``V`` = off).
            top_p: float32 ``[B]`` in ``(0, 1]`` (1 = off).
            min_p: float32 ``[B]`` in ``[0, 1]`` (0 = off).
            seed, offset: int64 ``[B]`` on ``probs.device``: each row's random state this step.

        Returns:
            int64 ``[B]``. No host synchronisation (CUDA-graph safe). Semantics: top-k -> top-p
            on the distribution renormalised over the kept tokens -> min-p relative to the max
            probability -> renormalise -> draw.
        """
        ...


@dataclass(frozen=True, slots=True)
class SamplingHints:
    """What the caller knows on the host about a batch, for kernels that declare
    ``takes_hints = True`` (``sample_logits(..., hints=...)``): which launches the batch can
    need. A kernel may skip work a hint rules out; a wrong hint may cost speed, never a wrong
    token. Host values only: a graph captured with hints is valid for batches with equal ones.
    """

    top_k: bool = True  # some row has top_k < V
    wide_top_k: bool = True  # some row has NARROW_TOP_K < top_k < V
    top_p: bool = True  # some row has top_p < 1
    greedy: bool = True  # some row is greedy (the sampler passes it top_k = 1)


# ---- counter-based random numbers -----------------------------------------------------------


def _lsr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (``>>`` on int64 is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 ``[...]`` (wrapping arithmetic). Graph-safe."""
    x = (x ^ _lsr(x, 30)) * MIX1
    x = (x ^ _lsr(x, 27)) * MIX2
    return x ^ _lsr(x, 31)


def counter_uniform(seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 ``[B]`` uniform in ``[0, 1)`` (multiples of 2^-24) from int64 ``seed`` and
    ``offset`` ``[B]``: a pure function of each row's pair. Graph-safe, no host sync."""
    h = mix64(mix64(seed) + (offset + 1) * GOLDEN)
    return _lsr(h, 64 - UNIFORM_BITS).to(torch.float32) * (1.0 / (1 << UNIFORM_BITS))


# ---- the torch reference kernel ---------------------------------------------------------------


def filter_weights(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The kept probabilities in token-id order, zero elsewhere (not renormalised).

    Args / shapes as :meth:`SamplingKernel.sample`. Returns float32 ``[B, V]`` whose non-zero
    entries are exact copies of ``probs`` entries. Graph-safe: a stable sort (lower id first
    among equal probabilities), masks and one scatter; no data-dependent shapes.
    """
    vocab = probs.shape[-1]
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=probs.device)
    keep = rank < top_k.unsqueeze(-1)
    masked = torch.where(keep, sorted_p, 0.0)
    cum = torch.cumsum(masked, dim=-1)
    # exclusive prefix (mass strictly before each rank), compared with top_p * the kept mass:
    # the same as comparing the renormalised mass with top_p, without a division.
    before = torch.nn.functional.pad(cum[:, :-1], (1, 0))
    limit = top_p.unsqueeze(-1) * cum[:, -1:]
    keep &= (before < limit) | (top_p.unsqueeze(-1) >= 1.0)
    keep &= sorted_p >= min_p.unsqueeze(-1) * sorted_p[:, :1]
    keep &= sorted_p > 0
    kept = torch.where(keep, sorted_p, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, kept)


def draw_inverse_cdf(
    weights: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """Draw one index per row with probability proportional to ``weights`` (float32 ``[B, V]``,
    >= 0, at least one positive entry per row), by inverse CDF in index order with
    ``counter_uniform(seed, offset)``. Returns int64 ``[B]``. Graph-safe, no host sync."""
    cdf = torch.cumsum(weights, dim=-1)
    total = cdf[:, -1:].contiguous()
    target = counter_uniform(seed, offset).unsqueeze(-1) * total
    # first index whose cdf exceeds the target: its weight is positive (the cdf rises there)
    idx = torch.searchsorted(cdf, target, right=True)
    # u * total may round up to the total: then the first index where the cdf reaches the
    # total, i.e. the last one with positive weight
    last = torch.searchsorted(cdf, total, right=False)
    return torch.where(idx < weights.shape[-1], idx, last).squeeze(-1)


def draw_unfiltered(
    probs: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """The torch kernel for batches without top-k / top-p (no sort): the kept weights are
    bitwise those ``filter_weights`` gives with ``top_k = V, top_p = 1``, so the token is the
    same. int64 ``[B]``; graph-safe."""
    floor = min_p.unsqueeze(-1) * probs.amax(dim=-1, keepdim=True)
    weights = torch.where((probs >= floor) & (probs > 0), probs, 0.0)
    return draw_inverse_cdf(weights, seed, offset)


class TorchSamplingKernel:
    """Reference kernel: sort-based filters + inverse-CDF draw (see the module docstring).
    Position-invariant and graph-safe on CPU and CUDA."""

    name = "torch.sampler"
    position_invariant = True

    def sample(self, probs, top_k, top_p, min_p, seed, offset) -> torch.Tensor:
        return draw_inverse_cdf(filter_weights(probs, top_k, top_p, min_p), seed, offset)
