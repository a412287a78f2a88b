"""``Op.REJECTION_SAMPLING`` through FlashInfer's ``chain_speculative_sampling``.

FlashInfer's fused kernel verifies a chain of ``k`` drafts per row against ``k + 1`` target
distributions, but it knows neither per-row draft counts, greedy rows, out-of-vocabulary ids nor
one-hot (``draft_probs=None``) drafts. This adapter maps the project's contract
(:mod:`layerzero_serve.kernels.rejection_api`; the torch reference
``layerzero_serve.kernels.torch_ref.rejection_sample`` has the same arguments and outputs) onto
it without changing the law of the emitted tokens:

* **Fewer drafts than k.** A row's drafts end at ``n = num_drafts`` or at its first
  out-of-vocabulary id, whichever comes first. Position ``n`` is given the draft id 0 with a
  one-hot draft distribution at 0: FlashInfer accepts it with probability ``p_n(0)`` and
  otherwise draws from ``p_n`` without 0, renormalised, so the token emitted at position ``n`` is
  distributed exactly as ``p_n`` (the bonus law). Everything after position ``n`` is discarded.
* **One-hot drafts** become explicit one-hot ``[B, k, V]`` distributions.
* **Greedy rows** get one-hot target distributions at the target's argmax (lowest id on ties) and
  one-hot drafts: a draft is accepted iff it is the argmax, and the emitted token is the argmax.
* **Garbage** (NaN, inf) in padding positions never reaches FlashInfer: padded positions are
  replaced by one-hot rows.

Randomness: FlashInfer draws from its own Philox stream, so results are not bitwise equal to the
reference's (only equal in law). The per-row seed is taken from the bits of this step's ``noise``
(and ``uniforms``), so the adapter is a deterministic function of its inputs, and fresh inputs
give fresh draws. CUDA-graph safe: seeds and offsets are device tensors, no host sync, every
shape is fixed by the inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from layerzero_serve.kernels.rejection_api import check_rejection_inputs, emitted_ids
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.kernels.torch_ref import rejection_sample

__all__ = ["SPECS", "FlashInferRejectionSampler", "chain_inputs", "chain_rejection_sample"]


def chain_inputs(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    num_drafts: torch.Tensor,
    is_greedy: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The equal-length chain FlashInfer verifies (see the module docstring).

    Args: as :func:`layerzero_serve.kernels.torch_ref.rejection_sample` (``k >= 1``).

    Returns:
        ``(ids, q, p, n)``: int32 ``[B, k]`` draft ids (0 from each row's end on), float32
        ``[B, k, V]`` draft distributions, float32 ``[B, k+1, V]`` target distributions, int64
        ``[B]`` the row's real draft count. CUDA-graph safe.
    """
    b, k1, v = target_probs.shape
    k = k1 - 1
    dev = target_probs.device
    pos = torch.arange(k, device=dev)
    n = num_drafts.to(torch.long).clamp(0, k)
    real = pos < n[:, None]
    bad = real & ((draft_ids < 0) | (draft_ids >= v))
    # an out-of-vocabulary draft ends the row's drafts (it is rejected; the law is p's there)
    n = torch.where(bad.any(dim=1), bad.to(torch.int8).argmax(dim=1), n)
    real = pos < n[:, None]
    ids = torch.where(real, draft_ids, 0)
    one_hot_q = torch.nn.functional.one_hot(ids, v).to(torch.float32)
    keep_q = real if is_greedy is None else real & ~is_greedy[:, None]
    q = one_hot_q if draft_probs is None else torch.where(keep_q[..., None], draft_probs, one_hot_q)
    live = torch.arange(k1, device=dev) <= n[:, None]  # position n draws the row's last token
    fill = torch.zeros((b, k1), dtype=torch.long, device=dev)  # padding targets: one-hot at 0
    if is_greedy is not None:
        fill = torch.where(is_greedy[:, None], target_probs.argmax(dim=2), fill)
        live = live & ~is_greedy[:, None]
    one_hot_p = torch.nn.functional.one_hot(fill, v).to(torch.float32)
    p = torch.where(live[..., None], target_probs, one_hot_p)
    return ids.to(torch.int32), q, p, n


def _seeds(uniforms: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]`` Philox seeds from the bits of this step's random inputs (no host sync)."""
    hi = noise[:, 0].contiguous().view(torch.int32).to(torch.long)
    lo = noise[:, -1].contiguous().view(torch.int32).to(torch.long) & 0xFFFFFFFF
    seed = (hi << 32) ^ lo
    if uniforms.shape[1]:
        seed = seed ^ (uniforms[:, 0].contiguous().view(torch.int32).to(torch.long) << 16)
    return seed


def chain_rejection_sample(
    chain: Callable,
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    num_drafts: torch.Tensor,
    is_greedy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify drafts through ``chain`` (``flashinfer.sampling.chain_speculative_sampling`` or a
    function with its signature and law).

    Args and returns: as :func:`layerzero_serve.kernels.torch_ref.rejection_sample`;
    ``uniforms`` and ``noise`` only seed ``chain``'s own random stream. CUDA-graph safe when
    ``chain`` is.
    """
    b, k, _ = check_rejection_inputs(
        draft_ids, draft_probs, target_probs, uniforms, noise, num_drafts, is_greedy
    )
    if k == 0:  # no chain to verify: one draw from p_0
        return rejection_sample(
            draft_ids, draft_probs, target_probs, uniforms, noise, num_drafts, is_greedy
        )
    ids, q, p, n = chain_inputs(draft_ids, draft_probs, target_probs, num_drafts, is_greedy)
    dev = target_probs.device
    seed = _seeds(uniforms, noise)
    offset = torch.zeros(b, dtype=torch.long, device=dev)
    accepted = torch.zeros(b, dtype=torch.int32, device=dev)
    emitted = torch.zeros(b, dtype=torch.int32, device=dev)
    out = chain(q, ids, p, accepted, emitted, deterministic=True, seed=seed, offset=offset)
    if isinstance(out, tuple):  # the public API returns (ids, accepted, emitted)
        out, _, emitted = out
    a = torch.minimum(emitted.to(torch.long), n)  # drafts past the row's end never count
    token = out.to(torch.long).gather(1, a[:, None])[:, 0]
    return emitted_ids(draft_ids, a, token), a.to(torch.int32)


class FlashInferRejectionSampler:
    """Kernel-catalog adapter: :func:`chain_rejection_sample` over FlashInfer (``run`` and
    ``__call__`` take the reference's arguments)."""

    name = "flashinfer.rejection_sampling"

    def __init__(self, ctx: KernelContext | None = None) -> None:
        import flashinfer.sampling as fs

        self.ctx = ctx
        self._chain = fs.chain_speculative_sampling

    def run(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return chain_rejection_sample(self._chain, *args, **kwargs)

    __call__ = run


SPECS = [
    KernelSpec(
        "flashinfer.rejection_sampling",
        Op.REJECTION_SAMPLING,
        "flashinfer",
        priority=40,  # below triton.rejection_sampling (50): it adds one-hot passes over [B, k, V]
        graph_safe=True,
        min_sm=75,
        factory=FlashInferRejectionSampler,
        doc="FlashInfer 0.7 docs: flashinfer.sampling.chain_speculative_sampling "
        "(seed/offset tensors for CUDA graphs); equal in law, not bitwise, to the reference",
    ),
]
