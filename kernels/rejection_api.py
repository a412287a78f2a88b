"""The ``Op.REJECTION_SAMPLING`` kernel contract: the rule every verification kernel follows, the
input check and the output layout they share. The torch reference is
:func:`layerzero_serve.kernels.torch_ref.rejection_sample` (and its catalog adapter
:class:`~layerzero_serve.kernels.torch_ref.TorchRejectionSampler`); the Triton kernel and the
FlashInfer adapter follow the same contract.

**Rule** (Leviathan et al. 2023; Chen et al. 2023). For request ``b`` with
``n = num_drafts[b]`` drafts ``x_0..x_{n-1}``, draft distributions ``q_j`` and target
distributions ``p_j``: position ``j < n`` accepts ``x_j`` iff
``uniforms[b, j] * q_j(x_j) < p_j(x_j)``, i.e. with probability ``min(1, p_j(x_j) / q_j(x_j))``
(a product, not a quotient: exact in float32 on every device, and ``p_j(x_j) = 0`` is never
accepted); at the first rejection ``a`` the recovered token is drawn from
``normalize(max(p_a - q_a, 0))`` (from ``p_a`` when that residual is all zero); when all
``n`` drafts are accepted a bonus token is drawn from ``p_n``. Either way exactly one token
follows the accepted drafts, and the emitted tokens are distributed exactly as if sampled
from the target one by one. ``draft_probs=None`` means a one-hot ``q`` at the draft id.

**Greedy rows** (``is_greedy[b]``) accept the longest prefix with ``x_j == argmax p_j`` and
then emit ``argmax p_a`` (lowest id on ties); they use no random numbers.

**Randomness is an input**, so the torch reference and the Triton kernel agree bitwise:
``uniforms`` for acceptance and ``noise = 1 / E``, ``E ~ Exp(1)`` i.i.d. (strictly positive
and finite), for the one draw per row: ``argmax_i(w_i * noise_i)`` is distributed as
``w / sum(w)`` for any ``w >= 0`` (the exponential race), with no normalisation, cumulative
sum or division on the device (``layerzero_serve.spec_decode.draw_randoms`` makes both).

**Padding and bad input never reach an index**: ``num_drafts`` is clamped to ``[0, k]``;
draft positions ``j >= num_drafts[b]`` and draft ids outside ``[0, V)`` are rejected, and the
id used for gathers is clamped into range. An out-of-vocabulary draft is rejected with
acceptance probability 0 and the token at its position is drawn from ``p`` itself (residual
``= p``, as if ``q`` were 0 there), so the emitted tokens still follow the target's law; ids
are checked on the device, not on the host, because that would need a host sync.

Everything is shape-static: CUDA-graph safe.
"""

from __future__ import annotations

import torch

from layerzero_serve.errors import ValidationError

__all__ = ["check_rejection_inputs", "check_tensor", "emitted_ids"]


def check_tensor(name: str, t: object, dims: int, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a ``dims``-D tensor of ``dtype``, else a ValidationError naming ``name``.
    Host metadata only (no sync)."""
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValidationError(name, shape, f"a {dims}-D {dtype} tensor")
    if t.dtype != dtype:
        raise ValidationError(name, t.dtype, str(dtype))
    return t


def check_rejection_inputs(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    num_drafts: torch.Tensor,
    is_greedy: torch.Tensor | None = None,
) -> tuple[int, int, int]:
    """Check shapes, dtypes and devices (host metadata only: no sync); returns ``(B, k, V)``.

    Raises ValidationError naming the parameter. Values (ids, counts, probabilities) are not
    checked here: out-of-range ids and counts are handled on the device (see the module
    docstring). Host metadata only, so it may run while a graph is captured.
    """
    target_probs = check_tensor("target_probs", target_probs, 3, torch.float32)
    b, k1, v = target_probs.shape
    if k1 < 1 or v < 1:
        raise ValidationError("target_probs", tuple(target_probs.shape), "[B, k+1, V], V >= 1")
    k = k1 - 1
    expect = {
        "draft_ids": (draft_ids, 2, torch.int64, (b, k)),
        "uniforms": (uniforms, 2, torch.float32, (b, k)),
        "noise": (noise, 2, torch.float32, (b, v)),
        "num_drafts": (num_drafts, 1, torch.int32, (b,)),
    }
    if draft_probs is not None:
        expect["draft_probs"] = (draft_probs, 3, torch.float32, (b, k, v))
    if is_greedy is not None:
        expect["is_greedy"] = (is_greedy, 1, torch.bool, (b,))
    for name, (t, dims, dtype, shape) in expect.items():
        check_tensor(name, t, dims, dtype)
        if tuple(t.shape) != shape:
            raise ValidationError(name, tuple(t.shape), f"shape {shape} (from target_probs)")
        if t.device != target_probs.device:
            raise ValidationError(name, str(t.device), f"device {target_probs.device}")
    return b, k, v


def emitted_ids(draft_ids: torch.Tensor, a: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The output of a verification: int64 ``[B, k+1]``, the first ``a[b]`` drafts of each row,
    then ``token[b]``, then -1. ``draft_ids`` int64 ``[B, k]``; ``a``, ``token`` int64 ``[B]``.
    CUDA-graph safe."""
    b, k = draft_ids.shape
    pos = torch.arange(k, device=draft_ids.device)
    out = torch.full((b, k + 1), -1, dtype=torch.int64, device=draft_ids.device)
    out[:, :k] = torch.where(pos < a[:, None], draft_ids, -1)
    return out.scatter_(1, a[:, None], token[:, None])
