"""Speculative verification helpers of the runtime: the random inputs of a verification step
(:func:`draw_randoms`) and argmax-only greedy verification (:func:`greedy_verify`).

The torch reference of lossless rejection sampling (:func:`rejection_sample`), its input check
and output layout, and its kernel-catalog adapter live in the kernels package
(``layerzero_serve.kernels.torch_ref`` and ``layerzero_serve.kernels.rejection_api``, which
states the rule); they are re-exported here under their old names. Randomness is an input:
``uniforms`` float32 ``[B, k]`` in [0, 1) for acceptance and ``noise`` float32 ``[B, V]`` with
``noise = 1 / E``, ``E ~ Exp(1)`` i.i.d., strictly positive and finite, for the one draw per row.
"""

from __future__ import annotations

import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.rejection_api import (
    check_rejection_inputs,
    check_tensor,
    emitted_ids,
)
from layerzero_serve.kernels.torch_ref import TorchRejectionSampler, rejection_sample
from layerzero_serve.spec_decode._proposer import check_int

__all__ = [
    "TorchRejectionSampler",
    "check_rejection_inputs",
    "draw_randoms",
    "emitted_ids",
    "greedy_verify",
    "rejection_sample",
]

# Smallest E used for ``noise = 1 / E``: keeps noise finite (a 0 * inf would be NaN). Drawing an
# exponential below 1e-30 has probability 1e-30, so the law is unchanged in practice.
_MIN_EXP = 1e-30


def draw_randoms(
    num_rows: int,
    k: int,
    vocab_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random inputs of one verification step.

    Returns ``(uniforms, noise)``: float32 ``[num_rows, k]`` uniforms in [0, 1) and float32
    ``[num_rows, vocab_size]`` reciprocal standard exponentials, on ``device`` (the generator's
    device when None). CUDA-graph safe with a CUDA generator registered with the graph (the
    default one is); no host sync.
    """
    num_rows = check_int("num_rows", num_rows, 0, 1 << 24)
    k = check_int("k", k, 0, 64)
    vocab_size = check_int("vocab_size", vocab_size, 1, (1 << 31) - 1)
    if num_rows * vocab_size > 1 << 34:  # 64 GiB of float32 noise: a caller's mistake
        raise ValidationError(
            "num_rows * vocab_size", num_rows * vocab_size, "at most 2**34 noise values"
        )
    if device is None:
        device = generator.device if generator is not None else "cpu"
    uniforms = torch.rand(num_rows, k, generator=generator, device=device)
    exp = torch.empty(num_rows, vocab_size, device=device).exponential_(generator=generator)
    return uniforms, exp.clamp_min_(_MIN_EXP).reciprocal_()


def greedy_verify(
    draft_ids: torch.Tensor, target_ids: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification from the target's argmax ids alone (no ``[B, k+1, V]`` probs).

    Args:
        draft_ids: int64 ``[B, k]``; target_ids: int64 ``[B, k+1]`` argmax of the target at each
        position; num_drafts: int32 ``[B]`` (clamped to ``[0, k]``).

    Returns:
        Same as :func:`rejection_sample` with every row greedy. CUDA-graph safe.
    """
    check_tensor("target_ids", target_ids, 2, torch.int64)
    b, k1 = target_ids.shape
    for name, t, dims, dtype, shape in (
        ("draft_ids", draft_ids, 2, torch.int64, (b, k1 - 1)),
        ("num_drafts", num_drafts, 1, torch.int32, (b,)),
    ):
        check_tensor(name, t, dims, dtype)
        if tuple(t.shape) != shape:
            raise ValidationError(name, tuple(t.shape), f"shape {shape} (from target_ids)")
    k = k1 - 1
    pos = torch.arange(k, device=draft_ids.device)
    n = num_drafts.to(torch.long).clamp(0, k)
    accept = (draft_ids == target_ids[:, :k]) & (pos < n[:, None])
    num_acc = accept.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    a = num_acc.to(torch.long)
    return emitted_ids(draft_ids, a, target_ids.gather(1, a[:, None])[:, 0]), num_acc
