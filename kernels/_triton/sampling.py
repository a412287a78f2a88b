"""Fused top-k / top-p / min-p filtering and draw in one Triton kernel (no sort).

``triton_sample(probs, top_k, top_p, min_p, seed, offset) -> int64 [B]`` with the semantics and
random numbers of :mod:`layerzero_serve.kernels.sampling_api` (ranking by descending probability,
lower id first on ties; inverse CDF in token-id order with ``counter_uniform(seed, offset)``).

One program handles ``BLOCK_B`` rows (1 on a GPU, many under the interpreter, where each tile op
is one NumPy call) and streams the vocabulary in ``BLOCK_V`` chunks, so any vocabulary size works
(32000, 128256, 151936: the last chunk is masked). Thresholds instead of a sort:

* ``tk``, the k-th largest probability, by bisection over float32 bit patterns (non-negative
  floats order like their bits): ``SPLIT`` pivots per pass over the row, so ``log2(SPLIT)`` bits
  per pass. Kept: ``p > tk`` and the first ``k - count(p > tk)`` tokens equal to ``tk`` in id order.
* ``tp``, the top-p threshold: the largest ``t >= tk`` with ``mass(p >= t) >= top_p * Zk`` (``Zk``
  the top-k mass), same bisection. Kept: ``p > tp``, and a token equal to ``tp`` when the mass
  before it (``mass(p > tp)`` + ``tp`` times the equal tokens of lower id) is ``< top_p * Zk``.
* min-p: ``p >= min_p * p_max``; then the kept mass ``Z`` and one inverse-CDF scan for
  ``u * Z``. A row never needing top-k or top-p skips its bisection (per program).

Cost: about ``2 + 2 * (ceil(30 / log2(SPLIT)) + 1) + 2`` passes over the row when both top-k
and top-p are on (each pass reads the row, from L2 for rows that fit); the bisection keeps
per-lane partial sums and reduces once per pass. Position-invariant (a row's token depends on
its probabilities, seed and offset only) and graph-safe (no host synchronisation; the grid
depends on shapes only). Compiles for sm_80/90/100 with Triton 3.6 to 3.9 (checked ahead of
time on a CPU by tests/kernels/test_triton_sampling.py).
"""

from __future__ import annotations

import os

import torch

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op

__all__ = ["SPECS", "TritonSamplingKernel", "triton_sample"]

# The catalog imports this module for SPECS on every machine: triton is imported, and the
# functions below are decorated with triton.jit, on first use (``_kernel()``), so that importing
# stays cheap, works without triton, and TRITON_INTERPRET is read when a kernel first runs.
tl = None
_JIT_NAMES = (
    "_mix64",
    "_counter_uniform",
    "_load",
    "_narrow_bounds",
    "_bisect",
    "_kept",
    "_sample_rows",
    "_sampling_kernel",
)
_built: list = []


def _kernel():
    if not _built:
        import triton
        import triton.language

        g = globals()
        g["tl"] = triton.language
        for name in _JIT_NAMES:
            g[name] = triton.jit(g[name])
        _built.append(g["_sampling_kernel"])
    return _built[0]


def _mix64(x):
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


def _counter_uniform(seed, offset):
    """Same bits as sampling_api.counter_uniform (uint64 arithmetic wraps like torch int64)."""
    s = seed.to(tl.uint64, bitcast=True)
    o = offset.to(tl.uint64, bitcast=True)
    h = _mix64(_mix64(s) + (o + 1) * 0x9E3779B97F4A7C15)
    return (h >> 40).to(tl.float32) * (1.0 / 16777216.0)


def _load(base, rmask, start, V, x0, inv_t, BLOCK_V: tl.constexpr, LOGITS: tl.constexpr):
    """A chunk of weights ``[BLOCK_B, BLOCK_V]``: the probabilities, or with LOGITS the
    unnormalised ``exp((x - x0) * inv_t)`` of logits ``x`` (``x0`` the row maximum)."""
    cols = start + tl.arange(0, BLOCK_V)
    mask = rmask[:, None] & (cols[None, :] < V)
    # -1 never compares >= a threshold (all thresholds are >= 0) and is never kept
    p = tl.load(base + cols[None, :], mask=mask, other=-1.0)
    if LOGITS:
        p = tl.where(mask, tl.exp((p - x0[:, None]) * inv_t[:, None]), -1.0)
    return p, cols


def _bisect(base, rmask, V, x0, inv_t, lo, hi, cnt_hi, mass_hi, k, target,
            USE_MASS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
            SPLIT: tl.constexpr, ITERS: tl.constexpr, LOGITS: tl.constexpr):  # fmt: skip
    """Largest bit pattern ``t`` in ``[lo, hi)`` with ``count(p >= t) >= k`` (or ``mass(p >=
    t) >= target`` when USE_MASS); invariant: true at ``lo``, false at ``hi``. Also returns
    the count and mass of ``p >= hi`` at the end, i.e. of ``p > t``."""
    j = tl.arange(0, SPLIT)
    for _ in range(ITERS):
        width = (hi - lo).to(tl.int64)
        piv = (lo.to(tl.int64)[:, None] + (width[:, None] * j[None, :]) // SPLIT).to(tl.int32)
        pivf = piv.to(tl.float32, bitcast=True)
        # per-lane partial counts and masses, reduced once after the pass: no cross-warp
        # reduction (and barrier) per chunk
        cnt3 = tl.zeros([BLOCK_B, SPLIT, BLOCK_V], tl.int32)
        mass3 = tl.zeros([BLOCK_B, SPLIT, BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            p, cols = _load(base, rmask, start, V, x0, inv_t, BLOCK_V, LOGITS)
            ge = p[:, None, :] >= pivf[:, :, None]  # [BLOCK_B, SPLIT, BLOCK_V]
            cnt3 += ge.to(tl.int32)
            mass3 += tl.where(ge, p[:, None, :], 0.0)
        cnt = tl.sum(cnt3, 2)
        mass = tl.sum(mass3, 2)
        if USE_MASS:  # noqa: SIM108  (a constexpr branch, resolved at compile time)
            ok = mass >= target[:, None]
        else:
            ok = cnt >= k[:, None]
        lo, hi, cnt_hi, mass_hi = _narrow_bounds(piv, ok, cnt, mass, lo, hi, cnt_hi, mass_hi)
    return lo, cnt_hi, mass_hi


def _narrow_bounds(piv, ok, cnt, mass, lo, hi, cnt_hi, mass_hi):
    """One bisection step from the pivots' totals (``[BB, SPLIT]``; ``ok``: the criterion holds
    there): the new ``(lo, hi, count at hi, mass at hi)``. The count/mass kept is that of the
    pivot that becomes hi (the smallest failing one; pivots repeat once the range is narrower
    than SPLIT, with equal counts: max, not sum). Shared with the split path."""
    new_hi = tl.min(tl.where(ok, 0x7FFFFFFF, piv), 1)
    take = new_hi < hi
    at_hi = piv == new_hi[:, None]
    cnt_hi = tl.where(take, tl.max(tl.where(at_hi, cnt, 0), 1), cnt_hi)
    mass_hi = tl.where(take, tl.max(tl.where(at_hi, mass, 0.0), 1), mass_hi)
    return tl.maximum(lo, tl.max(tl.where(ok, piv, 0), 1)), tl.minimum(hi, new_hi), cnt_hi, mass_hi


def _kept(p, cols, tk, r_k, tp, mass_gt_p, target_p, floor_m, eq_k_seen, eq_p_seen):
    """Kept mask of one chunk and the updated running counts of tokens equal to tk / tp."""
    eq_k = p == tk[:, None]
    eq_p = p == tp[:, None]
    rank_k = eq_k_seen[:, None] + tl.cumsum(eq_k.to(tl.int32), 1) - 1  # among equals, id order
    rank_p = eq_p_seen[:, None] + tl.cumsum(eq_p.to(tl.int32), 1) - 1
    keep = (p > tk[:, None]) | (eq_k & (rank_k < r_k[:, None]))
    before = mass_gt_p[:, None] + tp[:, None] * rank_p.to(tl.float32)
    keep &= (p > tp[:, None]) | (eq_p & (before < target_p[:, None]))
    keep &= (p >= floor_m[:, None]) & (p > 0.0)
    return keep, eq_k_seen + tl.sum(eq_k.to(tl.int32), 1), eq_p_seen + tl.sum(eq_p.to(tl.int32), 1)


def _sample_rows(base, rmask, k, top_p, min_p, seed, offset, x0, inv_t, V,
                 BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT: tl.constexpr,
                 ITERS: tl.constexpr, LOGITS: tl.constexpr):  # fmt: skip
    """int32 ``[BLOCK_B]``: each row's token, streaming its weights (see ``_load``)."""

    pmax = tl.zeros([BLOCK_B], tl.float32)
    total = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, V, BLOCK_V):
        p, cols = _load(base, rmask, start, V, x0, inv_t, BLOCK_V, LOGITS)
        # reduce max(p, 0), not the loaded p itself: Triton 3.6's thread-locality pass rewrites
        # a reduction of a load accumulated across the loop and asserts when the result has
        # more than one use after the loop (pmax has several)
        q = tl.maximum(p, 0.0)
        pmax = tl.maximum(pmax, tl.max(q, 1))
        total += tl.sum(q, 1)
    hi0 = pmax.to(tl.int32, bitcast=True) + 1
    zero_i = tl.zeros([BLOCK_B], tl.int32)
    zero_f = tl.zeros([BLOCK_B], tl.float32)

    # top-k threshold; rows without top-k keep everything (tk = -1, r_k irrelevant)
    need_k = rmask & (k < V)
    tk = zero_f - 1.0
    r_k = zero_i
    zk = total
    if tl.max(need_k.to(tl.int32), 0) > 0:
        lo, cnt_gt, mass_gt = _bisect(base, rmask, V, x0, inv_t, zero_i, hi0, zero_i, zero_f,
                                      k, zero_f, False, BLOCK_B, BLOCK_V, SPLIT, ITERS,
                                      LOGITS)  # fmt: skip
        tk_b = lo.to(tl.float32, bitcast=True)
        tk = tl.where(need_k, tk_b, tk)
        r_k = k - cnt_gt
        zk = tl.where(need_k, mass_gt + r_k.to(tl.float32) * tk_b, total)

    # top-p threshold, searched at or above tk (the top-p set is a prefix of the top-k set)
    need_p = rmask & (top_p < 1.0)
    target_p = top_p * zk
    tp = zero_f - 1.0
    mass_gt_p = zero_f
    if tl.max(need_p.to(tl.int32), 0) > 0:
        lo0 = tl.maximum(tk, 0.0).to(tl.int32, bitcast=True)
        lo, cnt_gt, mass_gt = _bisect(base, rmask, V, x0, inv_t, lo0, hi0, zero_i, zero_f, k,
                                      target_p, True, BLOCK_B, BLOCK_V, SPLIT, ITERS,
                                      LOGITS)  # fmt: skip
        tp = tl.where(need_p, lo.to(tl.float32, bitcast=True), tp)
        mass_gt_p = mass_gt

    floor_m = min_p * pmax
    z = zero_f
    seen_k = zero_i
    seen_p = zero_i
    for start in range(0, V, BLOCK_V):
        p, cols = _load(base, rmask, start, V, x0, inv_t, BLOCK_V, LOGITS)
        keep, seen_k, seen_p = _kept(p, cols, tk, r_k, tp, mass_gt_p, target_p, floor_m,
                                     seen_k, seen_p)  # fmt: skip
        z += tl.sum(tl.where(keep, p, 0.0), 1)

    goal = _counter_uniform(seed, offset) * z
    run = zero_f
    found = zero_i - 1
    last = zero_i - 1
    seen_k = zero_i
    seen_p = zero_i
    for start in range(0, V, BLOCK_V):
        p, cols = _load(base, rmask, start, V, x0, inv_t, BLOCK_V, LOGITS)
        keep, seen_k, seen_p = _kept(p, cols, tk, r_k, tp, mass_gt_p, target_p, floor_m,
                                     seen_k, seen_p)  # fmt: skip
        w = tl.where(keep, p, 0.0)
        cdf = run[:, None] + tl.cumsum(w, 1)
        hit = tl.min(tl.where(keep & (cdf > goal[:, None]), cols[None, :], 0x7FFFFFFF), 1)
        found = tl.where((found < 0) & (hit < 0x7FFFFFFF), hit, found)
        last = tl.maximum(last, tl.max(tl.where(keep, cols[None, :], -1), 1))
        run += tl.sum(w, 1)
    return tl.where(found >= 0, found, last)


def _sampling_kernel(probs_ptr, stride_b, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr,
                     out_ptr, B, V, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
                     SPLIT: tl.constexpr, ITERS: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    k = tl.load(top_k_ptr + rows, mask=rmask, other=V)
    top_p = tl.load(top_p_ptr + rows, mask=rmask, other=1.0)
    min_p = tl.load(min_p_ptr + rows, mask=rmask, other=0.0)
    seed = tl.load(seed_ptr + rows, mask=rmask, other=0)
    offset = tl.load(offset_ptr + rows, mask=rmask, other=0)
    base = probs_ptr + rows.to(tl.int64)[:, None] * stride_b
    unused = tl.zeros([BLOCK_B], tl.float32)
    token = _sample_rows(base, rmask, k, top_p, min_p, seed, offset, unused, unused, V,
                         BLOCK_B, BLOCK_V, SPLIT, ITERS, False)  # fmt: skip
    tl.store(out_ptr + rows, token.to(tl.int64), mask=rmask)


_MAX_NUMEL = 1 << 20  # Triton's largest tile


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def streaming_params(
    vocab: int, interp: bool, split: int | None = None, block_v: int | None = None
) -> tuple[int, int, int]:
    """(SPLIT, BLOCK_V, ITERS) of the streaming kernel for a vocabulary (defaults when None)."""
    import triton

    # A GPU wants one row per program and wide chunks; the interpreter pays per element of
    # every tile op (NumPy), so it takes many rows per program and narrow chunks.
    split = split or (4 if interp else 8)
    v2 = triton.next_power_of_2(vocab)
    # GPU: 1024 x 8 pivots with 8 warps holds the per-lane partial sums in 117 registers on
    # sm_90 (no spills), two programs per SM
    block_v = block_v or (min(v2, max(64, v2 // 16)) if interp else min(v2, 1024))
    if split & (split - 1) or split < 2 or block_v & (block_v - 1):
        raise ValueError(f"split {split} and block_v {block_v} must be powers of two (split >= 2)")
    # Bit patterns of [0, 1] lie below 2^30 and each pass keeps 1/SPLIT of the range, rounded
    # up: ceil(30 / log2(SPLIT)) passes leave two candidates, one more pass settles them.
    return split, block_v, -(-30 // (split.bit_length() - 1)) + 1


def triton_sample(
    probs: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    block_b: int | None = None,
    block_v: int | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """See :class:`~layerzero_serve.kernels.sampling_api.SamplingKernel`. ``probs`` float32
    ``[B, V]`` with unit stride along V; ``top_k`` int32, ``top_p``/``min_p`` float32, ``seed``/
    ``offset`` int64, all ``[B]`` on its device. Returns int64 ``[B]``. Graph-safe."""
    import triton

    num_rows, vocab = probs.shape
    if probs.dtype != torch.float32 or probs.stride(1) != 1:
        raise ValueError(f"probs must be float32 with unit stride along V, got {probs.dtype}")
    out = torch.empty(num_rows, dtype=torch.int64, device=probs.device)
    if num_rows == 0:
        return out
    interp = _interpreting()
    split, block_v, iters = streaming_params(vocab, interp, split, block_v)
    if block_b is None:
        cap = max(1, _MAX_NUMEL // (split * block_v))  # the [BLOCK_B, SPLIT, BLOCK_V] tiles
        block_b = min(triton.next_power_of_2(num_rows), cap, 4096) if interp else 1
    grid = (triton.cdiv(num_rows, block_b),)
    _kernel()[grid](
        probs,
        probs.stride(0),
        top_k.to(torch.int32).contiguous(),
        top_p.to(torch.float32).contiguous(),
        min_p.to(torch.float32).contiguous(),
        seed.to(torch.int64).contiguous(),
        offset.to(torch.int64).contiguous(),
        out,
        num_rows,
        vocab,
        BLOCK_B=block_b,
        BLOCK_V=block_v,
        SPLIT=split,
        ITERS=iters,
        num_warps=1 if interp else 8,
    )
    return out


class TritonSamplingKernel:
    """The fused Triton kernel behind the ``SamplingKernel`` protocol."""

    name = "triton.sampling"
    position_invariant = True

    def __init__(self, ctx: KernelContext | None = None) -> None:
        self.ctx = ctx

    def sample(self, probs, top_k, top_p, min_p, seed, offset) -> torch.Tensor:
        return triton_sample(probs, top_k, top_p, min_p, seed, offset)


def _factory(ctx: KernelContext) -> TritonSamplingKernel:
    return TritonSamplingKernel(ctx)


SPECS = [
    KernelSpec(
        "triton.sampling",
        Op.SAMPLING,
        "triton",
        priority=50,
        graph_safe=True,
        device_types=frozenset({"cuda"}),
        min_sm=70,
        factory=_factory,
        doc="kernels/_triton/sampling.py: fused top-k/top-p/min-p by threshold bisection and "
        "an inverse-CDF draw from counter-based random numbers; position-invariant, no host sync",
    ),
]
