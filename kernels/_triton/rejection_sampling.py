"""Lossless speculative sampling as one Triton kernel: one program per request, a loop over the
``k`` draft positions, the vocabulary in blocks of ``BLOCK_V``.

Same inputs, outputs and rule as the torch reference
(``layerzero_serve.kernels.torch_ref.rejection_sample``; the rule is stated in
:mod:`layerzero_serve.kernels.rejection_api`):
given the same ``uniforms`` and ``noise`` the outputs are bitwise equal, because every value the
two compare is produced by the same correctly rounded float32 operations (``u * q(x) < p(x)``,
``max(p - q, 0) * noise``) and both break argmax ties towards the lowest id.

Per request the kernel reads two scalars per draft position (``p(x)``, ``q(x)``) and the
vocabulary rows of the one position where the row's extra token is drawn (plus, for greedy rows,
one row per accepted position for its argmax). CUDA-graph safe: no host sync, the grid is the
batch size and ``k`` is a compile-time constant.

Importing this module does not import triton (the kernel catalog imports it for ``SPECS`` on
machines without Triton): the kernel is decorated on first use, which is also when
``TRITON_INTERPRET`` is read, so CPU tests can set it any time before the first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op

if TYPE_CHECKING:  # bound at run time by _compiled()
    import triton.language as tl

__all__ = ["SPECS", "TritonRejectionSampler", "triton_rejection_sample"]


# Grid (B,). Contiguous tensors: draft_ids int64 [B, K], draft_probs f32 [B, K, V] (read only
# when HAS_DRAFT_PROBS), target_probs f32 [B, K+1, V], uniforms f32 [B, K], noise f32 [B, V],
# num_drafts int32 [B], greedy uint8 [B] (read only when HAS_GREEDY); writes out_ids int64
# [B, K+1] and num_accepted int32 [B]. BLOCK_K is a power of two >= K + 1.
def _rejection_kernel(
    draft_ids_ptr,
    draft_probs_ptr,
    target_probs_ptr,
    uniforms_ptr,
    noise_ptr,
    num_drafts_ptr,
    greedy_ptr,
    out_ids_ptr,
    num_accepted_ptr,
    vocab_size,
    K: tl.constexpr,
    HAS_DRAFT_PROBS: tl.constexpr,
    HAS_GREEDY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    t_row = target_probs_ptr + row * (K + 1) * vocab_size
    d_row = draft_probs_ptr + row * K * vocab_size
    n = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + row), 0), K)
    greedy = False
    if HAS_GREEDY:
        greedy = tl.load(greedy_ptr + row) != 0

    # Accepted prefix: `alive` stays true until the first rejection (no early exit in a loop).
    alive = n >= 0
    num_acc = n * 0
    for j in range(K):
        x = tl.load(draft_ids_ptr + row * K + j)
        ok = (j < n) & (x >= 0) & (x < vocab_size)
        xi = tl.minimum(tl.maximum(x, 0), vocab_size - 1)  # gather index, never out of range
        p_x = tl.load(t_row + j * vocab_size + xi)
        q_x = 1.0
        if HAS_DRAFT_PROBS:
            q_x = tl.load(d_row + j * vocab_size + xi)
        u = tl.load(uniforms_ptr + row * K + j)
        acc = u * q_x < p_x
        if HAS_GREEDY:  # noqa: SIM102 - compile-time branch around a run-time one
            if greedy & alive & ok:  # argmax of p_j, blockwise, lowest id on ties
                best_v = -1.0
                best_i = xi * 0
                for v0 in range(0, vocab_size, BLOCK_V):
                    mask = v0 + cols < vocab_size
                    p = tl.load(t_row + j * vocab_size + v0 + cols, mask=mask, other=-1.0)
                    m = tl.max(p, axis=0)
                    i = tl.argmax(p, axis=0).to(tl.int64) + v0
                    best_i = tl.where(m > best_v, i, best_i)
                    best_v = tl.maximum(m, best_v)
                acc = xi == best_i
        alive = alive & acc & ok
        num_acc += alive.to(tl.int32)

    # The row's one extra token at position a: residual max(p_a - q_a, 0) after a rejection,
    # p_a otherwise (bonus) or when the residual is all zero; argmax p_a for greedy rows.
    a = num_acc
    rejected = a < n
    a_draft = tl.maximum(tl.minimum(a, K - 1), 0)
    x_a = a_draft.to(tl.int64) * 0 - 1
    if K > 0:
        x_a = tl.load(draft_ids_ptr + row * K + a_draft)
    x_a = tl.where(rejected & (x_a >= 0) & (x_a < vocab_size), x_a, -1)  # -1: no one-hot q
    p_row = t_row + a.to(tl.int64) * vocab_size
    q_row = d_row + a_draft.to(tl.int64) * vocab_size
    best_w = -1.0  # max of residual * noise
    best_wi = row * 0
    best_s = -1.0  # max of p * noise
    best_si = row * 0
    best_p = -1.0  # max of p (greedy)
    best_pi = row * 0
    max_res = 0.0  # max of the residual itself (noise could round a tiny residual to 0)
    for v0 in range(0, vocab_size, BLOCK_V):
        offs = v0 + cols
        mask = offs < vocab_size
        p = tl.load(p_row + offs, mask=mask, other=0.0)
        r = tl.load(noise_ptr + row * vocab_size + offs, mask=mask, other=0.0)
        if HAS_DRAFT_PROBS:
            q = tl.load(q_row + offs, mask=mask, other=0.0)
            # bonus draws come from p itself, and so does the draw after an out-of-vocabulary
            # draft (x_a == -1): it was never drawn from q, so its residual is p
            q = tl.where(x_a >= 0, q, 0.0)
        else:
            q = tl.where(offs == x_a, 1.0, 0.0)
        res = tl.maximum(p - q, 0.0)
        max_res = tl.maximum(max_res, tl.max(res, axis=0))
        sw = res * r
        sp = p * r
        m = tl.max(sw, axis=0)
        best_wi = tl.where(m > best_w, tl.argmax(sw, axis=0).to(tl.int64) + v0, best_wi)
        best_w = tl.maximum(m, best_w)
        m = tl.max(sp, axis=0)
        best_si = tl.where(m > best_s, tl.argmax(sp, axis=0).to(tl.int64) + v0, best_si)
        best_s = tl.maximum(m, best_s)
        pm = tl.where(mask, p, -1.0)
        m = tl.max(pm, axis=0)
        best_pi = tl.where(m > best_p, tl.argmax(pm, axis=0).to(tl.int64) + v0, best_pi)
        best_p = tl.maximum(m, best_p)
    token = tl.where(max_res > 0.0, best_wi, best_si)
    if HAS_GREEDY:
        token = tl.where(greedy, best_pi, token)

    ks = tl.arange(0, BLOCK_K)
    drafts = tl.load(draft_ids_ptr + row * K + ks, mask=ks < K, other=-1)
    out = tl.where(ks < a, drafts, tl.where(ks == a, token, -1))
    tl.store(out_ids_ptr + row * (K + 1) + ks, out, mask=ks < K + 1)
    tl.store(num_accepted_ptr + row, num_acc)


_KERNEL = None


def _compiled():
    """The decorated kernel, built on first use (see the module docstring for why)."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language

        globals()["tl"] = triton.language  # the kernel body resolves `tl` from module globals
        _KERNEL = triton.jit(_rejection_kernel)
    return _KERNEL


def _check(name: str, t: object, shape: tuple[int, ...], dtype: torch.dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        raise ValueError(
            f"{name}: expected {dtype} {shape} on {device}, got {t.dtype} {tuple(t.shape)} "
            f"on {t.device}"
        )


def triton_rejection_sample(
    draft_ids: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    num_drafts: torch.Tensor,
    is_greedy: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify drafts with the Triton kernel.

    Args, shapes and dtypes as the torch reference: draft_ids int64 ``[B, k]``, draft_probs
    float32 ``[B, k, V]`` or None (one-hot at the draft id), target_probs float32
    ``[B, k+1, V]``, uniforms float32 ``[B, k]``, noise float32 ``[B, V]`` (``1 / Exp(1)``),
    num_drafts int32 ``[B]``, is_greedy bool ``[B]`` or None; ``block_v`` overrides the
    vocabulary tile (a power of two; tests use small tiles to cross block boundaries).

    Returns:
        int64 ``[B, k+1]`` output ids (-1 padded) and int32 ``[B]`` accepted counts, on the
        inputs' device. Non-contiguous inputs are copied first. CUDA-graph safe.
    """
    if not isinstance(target_probs, torch.Tensor) or target_probs.dim() != 3:
        raise ValueError("target_probs: expected a float32 [B, k+1, V] tensor")
    b, k1, v = target_probs.shape
    k, dev = k1 - 1, target_probs.device
    if k < 0 or v < 1:
        raise ValueError(f"target_probs: shape {tuple(target_probs.shape)} needs k+1 >= 1, V >= 1")
    _check("target_probs", target_probs, (b, k1, v), torch.float32, dev)
    _check("draft_ids", draft_ids, (b, k), torch.int64, dev)
    _check("uniforms", uniforms, (b, k), torch.float32, dev)
    _check("noise", noise, (b, v), torch.float32, dev)
    _check("num_drafts", num_drafts, (b,), torch.int32, dev)
    if draft_probs is not None:
        _check("draft_probs", draft_probs, (b, k, v), torch.float32, dev)
    if is_greedy is not None:
        _check("is_greedy", is_greedy, (b,), torch.bool, dev)
    if block_v is None:
        block_v = min(max(16, 1 << (v - 1).bit_length()), 2048)
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v={block_v}: must be a power of two")

    out_ids = torch.empty(b, k1, dtype=torch.int64, device=dev)
    num_accepted = torch.empty(b, dtype=torch.int32, device=dev)
    if b == 0:
        return out_ids, num_accepted
    target = target_probs.contiguous()
    # Unused pointer arguments get a real tensor of the same device (never dereferenced).
    has_q = draft_probs is not None and k > 0  # with k = 0 there is no q to read
    draft = draft_probs.contiguous() if has_q else target
    greedy = num_drafts if is_greedy is None else is_greedy.contiguous().view(torch.uint8)
    # With k = 0 the [B, 0] tensors may have no storage (a null pointer the launcher refuses):
    # pass tensors of the same dtypes instead; the kernel reads none of them.
    ids = draft_ids.contiguous() if k > 0 else out_ids
    u = uniforms.contiguous() if k > 0 else noise
    _compiled()[(b,)](
        ids,
        draft,
        target,
        u,
        noise.contiguous(),
        num_drafts.contiguous(),
        greedy,
        out_ids,
        num_accepted,
        v,
        K=k,
        HAS_DRAFT_PROBS=has_q,
        HAS_GREEDY=is_greedy is not None,
        BLOCK_V=block_v,
        BLOCK_K=max(2, 1 << (k1 - 1).bit_length()),  # next power of two >= k+1
    )
    return out_ids, num_accepted


class TritonRejectionSampler:
    """Kernel-catalog adapter of :func:`triton_rejection_sample` (``run`` and ``__call__``)."""

    name = "triton.rejection_sampling"

    def __init__(self, ctx: KernelContext | None = None) -> None:
        self.ctx = ctx
        _compiled()  # fail here, not mid-step, when triton is missing

    # the reference signature, as is (no host work added)
    run = staticmethod(triton_rejection_sample)
    __call__ = run


SPECS = [
    KernelSpec(
        "triton.rejection_sampling",
        Op.REJECTION_SAMPLING,
        "triton",
        priority=50,  # one launch, one pass over the vocabulary: above the torch reference
        graph_safe=True,
        device_types=frozenset({"cuda"}),
        min_sm=70,
        factory=TritonRejectionSampler,
        doc="kernels/_triton/rejection_sampling.py: one program per request, vocab in blocks",
    ),
]
