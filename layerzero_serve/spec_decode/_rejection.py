"""Lossless speculative sampling (torch reference): verify ``k`` draft tokens per request against
the target model's distributions in one batched, host-sync-free pass.

**Rule** (Leviathan et al. 2023; Chen et al. 2023). For request ``b`` with ``n = num_drafts[b]``
drafts ``x_0..x_{n-1}``, draft distributions ``q_j`` and target distributions ``p_j``:

* position ``j < n`` accepts ``x_j`` iff ``uniforms[b, j] * q_j(x_j) < p_j(x_j)``, i.e. with
  probability ``min(1, p_j(x_j) / q_j(x_j))`` (a product, not a quotient: exact in float32 on
  every device, and ``p_j(x_j) = 0`` is never accepted);
* at the first rejection ``a`` the recovered token is drawn from ``normalize(max(p_a - q_a, 0))``
  (from ``p_a`` when that residual is all zero); when all ``n`` drafts are accepted a bonus token
  is drawn from ``p_n``. Either way exactly one token follows the accepted drafts.

The emitted tokens are distributed exactly as if sampled from the target one by one.
``draft_probs=None`` means a one-hot ``q`` at the draft id (n-gram or greedy draft proposers).

**Greedy rows** (``is_greedy[b]``) accept the longest prefix with ``x_j == argmax p_j`` and then
emit ``argmax p_a`` (lowest id on ties); they use no random numbers.

**Randomness is an input**, so the torch reference and the Triton kernel agree bitwise:
``uniforms`` float32 ``[B, k]`` in [0, 1) for acceptance and ``noise`` float32 ``[B, V]`` with
``noise = 1 / E``, ``E ~ Exp(1)`` i.i.d., strictly positive and finite, for the one draw per row:
``argmax_i(w_i * noise_i)`` is distributed as ``w / sum(w)`` for any ``w >= 0`` (the exponential
race), with no normalisation, cumulative sum or division on the device. :func:`draw_randoms`
makes both.

**Padding and bad input never reach an index**: ``num_drafts`` is clamped to ``[0, k]``; draft
positions ``j >= num_drafts[b]`` and draft ids outside ``[0, V)`` are rejected, and the id used
for gathers is clamped into range. A draft id outside ``[0, V)`` is rejected with acceptance
probability 0 and the token at its position is drawn from the target ``p`` itself (residual
``= p``, as if ``q`` were 0 there), so the emitted tokens still follow the target's law; ids are
checked on the device, not validated on the host, because that would need a host sync.
Everything is shape-static: CUDA-graph safe.
"""

from __future__ import annotations

import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.spec_decode._proposer import check_int

__all__ = [
    "SPECS",
    "TorchRejectionSampler",
    "check_rejection_inputs",
    "draw_randoms",
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


def _tensor(name: str, t: object, dims: int, dtype: torch.dtype) -> torch.Tensor:
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
    checked here: out-of-range ids and counts are handled on the device (see module docstring).
    """
    target_probs = _tensor("target_probs", target_probs, 3, torch.float32)
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
        _tensor(name, t, dims, dtype)
        if tuple(t.shape) != shape:
            raise ValidationError(name, tuple(t.shape), f"shape {shape} (from target_probs)")
        if t.device != target_probs.device:
            raise ValidationError(name, str(t.device), f"device {target_probs.device}")
    return b, k, v


def rejection_sample(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    num_drafts: torch.Tensor,
    is_greedy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify drafts; the torch reference (see the module docstring for the rule).

    Args:
        draft_ids: int64 ``[B, k]`` proposed ids (positions past ``num_drafts`` are ignored; an
            id outside ``[0, V)`` is rejected and its position draws from the target).
        draft_probs: float32 ``[B, k, V]`` draft distributions ``q`` (processed like the
            request's sampling), or None for a one-hot ``q`` at each draft id.
        target_probs: float32 ``[B, k+1, V]`` target distributions ``p`` (processed the same
            way); position ``j`` is the distribution of the token after draft ``j-1``.
        uniforms: float32 ``[B, k]`` in [0, 1), one per draft position.
        noise: float32 ``[B, V]``, ``1 / Exp(1)`` samples, positive and finite.
        num_drafts: int32 ``[B]`` drafts per row (clamped to ``[0, k]``).
        is_greedy: bool ``[B]`` rows verified greedily, or None (no greedy row).

    Returns:
        ``(output_ids, num_accepted)``: int64 ``[B, k+1]`` accepted drafts then the recovered or
        bonus token, padded with -1; int32 ``[B]`` accepted drafts per row. All tensors on
        ``target_probs.device``. CUDA-graph safe: no host sync, shapes fixed by the inputs.

    CUDA graphs: safe to capture: no host sync, shapes fixed by the inputs.
    """
    b, k, v = check_rejection_inputs(
        draft_ids, draft_probs, target_probs, uniforms, noise, num_drafts, is_greedy
    )
    device = target_probs.device
    rows = torch.arange(b, device=device)
    pos = torch.arange(k, device=device)
    n = num_drafts.to(torch.long).clamp(0, k)
    in_vocab = (draft_ids >= 0) & (draft_ids < v)
    valid = in_vocab & (pos < n[:, None])
    idx = draft_ids.clamp(0, v - 1)  # safe to gather; `valid` forces rejection where clamped

    p_x = target_probs[:, :k].gather(2, idx[..., None]).squeeze(2)
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
    else:
        q_x = draft_probs.gather(2, idx[..., None]).squeeze(2)
    accept = uniforms * q_x < p_x
    if is_greedy is not None:
        greedy_accept = idx == target_probs[:, :k].argmax(dim=2)
        accept = torch.where(is_greedy[:, None], greedy_accept, accept)
    accept &= valid
    # Length of the accepted prefix: drafts after the first rejection do not count.
    num_acc = accept.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)

    # One draw per row at position a = num_acc: the residual after a rejection, else p (bonus).
    a = num_acc.to(torch.long)
    rejected = a < n
    p_a = target_probs[rows, a]
    a_draft = a.clamp(max=max(k - 1, 0))
    if k == 0:
        q_a = torch.zeros_like(p_a)
    elif draft_probs is None:  # one-hot at the rejected id (when it was a real id)
        hit = (rejected & in_vocab[rows, a_draft]).to(p_a.dtype)[:, None]
        q_a = torch.zeros_like(p_a).scatter_(1, idx[rows, a_draft][:, None], hit)
    else:
        # where, not a product: padding rows of draft_probs may hold anything (inf, NaN). An
        # out-of-vocabulary draft was never drawn from q: its rejection is certain and says
        # nothing about q, so the token there follows p itself (residual against q = 0).
        use_q = rejected & in_vocab[rows, a_draft]
        q_a = torch.where(use_q[:, None], draft_probs[rows, a_draft], 0.0)
    residual = (p_a - q_a).clamp_min(0.0)
    use_residual = residual.amax(dim=1) > 0
    weights = torch.where(use_residual[:, None], residual, p_a)
    token = (weights * noise).argmax(dim=1)
    if is_greedy is not None:
        token = torch.where(is_greedy, p_a.argmax(dim=1), token)

    return emitted_ids(draft_ids, a, token), num_acc


def emitted_ids(draft_ids: torch.Tensor, a: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The output of a verification: int64 ``[B, k+1]``, the first ``a[b]`` drafts of each row,
    then ``token[b]``, then -1. ``draft_ids`` int64 ``[B, k]``; ``a``, ``token`` int64 ``[B]``.
    CUDA-graph safe."""
    b, k = draft_ids.shape
    pos = torch.arange(k, device=draft_ids.device)
    out = torch.full((b, k + 1), -1, dtype=torch.int64, device=draft_ids.device)
    out[:, :k] = torch.where(pos < a[:, None], draft_ids, -1)
    return out.scatter_(1, a[:, None], token[:, None])


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
    _tensor("target_ids", target_ids, 2, torch.int64)
    b, k1 = target_ids.shape
    for name, t, dims, dtype, shape in (
        ("draft_ids", draft_ids, 2, torch.int64, (b, k1 - 1)),
        ("num_drafts", num_drafts, 1, torch.int32, (b,)),
    ):
        _tensor(name, t, dims, dtype)
        if tuple(t.shape) != shape:
            raise ValidationError(name, tuple(t.shape), f"shape {shape} (from target_ids)")
    k = k1 - 1
    pos = torch.arange(k, device=draft_ids.device)
    n = num_drafts.to(torch.long).clamp(0, k)
    accept = (draft_ids == target_ids[:, :k]) & (pos < n[:, None])
    num_acc = accept.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    a = num_acc.to(torch.long)
    return emitted_ids(draft_ids, a, target_ids.gather(1, a[:, None])[:, 0]), num_acc


class TorchRejectionSampler:
    """Kernel-catalog adapter of :func:`rejection_sample` (``run`` and ``__call__``)."""

    name = "torch.rejection_sampling"

    def __init__(self, ctx: KernelContext | None = None) -> None:
        self.ctx = ctx

    # the reference signature, as is (no host work added)
    run = staticmethod(rejection_sample)
    __call__ = run


SPECS = [
    KernelSpec(
        "torch.rejection_sampling",
        Op.REJECTION_SAMPLING,
        "torch",
        priority=0,
        graph_safe=True,
        device_types=frozenset({"cpu", "cuda"}),
        factory=TorchRejectionSampler,
        doc="layerzero_serve.spec_decode._rejection: vectorised gathers, no host sync",
    ),
]
