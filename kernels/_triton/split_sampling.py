"""The rows the top-K candidates cannot decide (top-k above K, a wide top-p, plain sampling,
min-p alone), sampled with each row split over many programs: the small-batch path of
:func:`~layerzero_serve.kernels._triton.topk_sampling.triton_sample_logits`.

The streaming kernel (:mod:`~layerzero_serve.kernels._triton.sampling`) gives a row one program
and about 25 passes over it; at batch 1 that is one SM reading a 128k vocabulary 25 times
(about 1 ms). Here every pass is a launch of ``B x S`` programs, one per chunk of a row (the
candidate path's chunks), and the same decisions are made:

* ``_search`` (one launch per bisection pass, ``2 * ITERS`` launches): ``P`` pivots between the
  row's current bounds ``[lo, hi)`` of the float32 bit pattern of the weight ``w = exp((x -
  x_max) / T)`` (``w`` in ``[0, 1]``: bits order like values). Each program counts, for its
  chunk, the tokens (stage 0, top-k) or the mass (stage 1, top-p) at or above every pivot and
  writes them; the last program of the row to finish (an atomic ticket) adds the ``S`` partial
  sums in chunk order (deterministic) and narrows the bounds, as the streaming ``_bisect`` does.
  Tokens outside ``[lo, hi)`` are counted once per block, without the pivot tile, so later
  passes cost a read of the chunk.
* ``_finish`` (one launch): each program adds its chunk's kept mass (ties at the two thresholds
  counted, not placed) and the last one of the row places the tied tokens in id order, finds
  the chunk where ``u * Z`` falls and scans that chunk with the streaming kernel's ``_kept``.

So the row is decided with the streaming kernel's thresholds and tie rules; only the float
summation order of masses differs (a token can change only where ``u * Z`` or a top-p target
sits on a summation boundary). Position-invariant, graph-safe (no host synchronisation; grids
depend on shapes; the tickets are reset by the program that completes them).

Per-row state (written by the candidate path's ``_draw`` for the rows it leaves ``pending``):
int32 ``[B, 8]`` and float32 ``[B, 8]``, see the ``I_*`` / ``F_*`` column names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerzero_serve.kernels._triton import sampling as streaming

__all__ = ["F_COLS", "I_COLS", "SplitPlan", "SplitScratch", "launch_split", "search_iters"]

tl = None
_kept = _counter_uniform = _narrow_bounds = None  # the streaming module's jitted helpers
_JIT_NAMES = (
    "_row_stats",
    "_pivots",
    "_narrow",
    "_ties_below_target",
    "_draw_split",
    "_search",
    "_finish",
)
_built: dict = {}

# int32 state columns
I_PEND, I_LO0, I_HI0, I_CNT0, I_LO1, I_HI1, I_CNT1, I_RK = range(8)
# float32 state columns
F_MASS0, F_MASS1, F_TK, F_TP, F_MGP, F_TARGET, F_TOTAL, F_TOP_P = range(8)
I_COLS = F_COLS = 8
PEND_TOPK, PEND_TOPP, PEND_ANY = 1, 2, 4  # I_PEND bits: stages to run, row is pending
_COLUMN_NAMES = (
    *["I_PEND", "I_LO0", "I_HI0", "I_CNT0", "I_LO1", "I_HI1", "I_CNT1", "I_RK"],
    *["F_MASS0", "F_MASS1", "F_TK", "F_TP", "F_MGP", "F_TARGET", "F_TOTAL", "F_TOP_P"],
    "PEND_ANY",
)


def _kernels() -> dict:
    if not _built:
        import triton
        import triton.language

        g = globals()
        g["tl"] = triton.language
        streaming._kernel()
        for name in ("_kept", "_counter_uniform", "_narrow_bounds"):
            g[name] = getattr(streaming, name)
        for name in _COLUMN_NAMES:  # jitted code reads globals only as constexprs
            g[name] = triton.language.constexpr(int(g[name]))
        for name in _JIT_NAMES:
            g[name] = triton.jit(g[name])
        _built["search"], _built["finish"] = g["_search"], g["_finish"]
    return _built


def _row_stats(cmax_ptr, temp_ptr, rows, rmask, SC, NSC: tl.constexpr):
    """(x_max, 1 / T) per row from the ``SC`` chunk maxima of the candidate path."""
    c = tl.arange(0, NSC)
    cm = tl.load(cmax_ptr + rows[:, None] * SC + c[None, :],
                 mask=rmask[:, None] & (c[None, :] < SC), other=float("-inf"))  # fmt: skip
    inv_t = 1.0 / tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    return tl.max(cm, 1), inv_t


def _pivots(lo, hi, P: tl.constexpr):
    """``[BB, P]`` pivots ``lo + (hi - lo) * j // P`` (the streaming ``_bisect``'s)."""
    j = tl.arange(0, P)
    width = (hi - lo).to(tl.int64)
    return (lo.to(tl.int64)[:, None] + (width[:, None] * j[None, :]) // P).to(tl.int32)


def _search(x_ptr, stride_b, temp_ptr, top_k_ptr, cmax_ptr, ist_ptr, fst_ptr, part_c_ptr,
            part_m_ptr, ticket_ptr, B, V, S, SC, STAGE: tl.constexpr, LAST: tl.constexpr,
            BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, P: tl.constexpr,
            NS: tl.constexpr, NSC: tl.constexpr):  # fmt: skip
    """One bisection pass of ``STAGE`` (0: top-k by count, 1: top-p by mass) for the chunk
    ``program_id(1)`` of the rows of block ``program_id(0)``; see the module docstring."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    chunk = tl.program_id(1)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    pend = tl.load(ist_ptr + rows * 8 + I_PEND, mask=rmask, other=0)
    active = rmask & ((pend & (1 << STAGE)) != 0)
    lo_col = I_LO0 if STAGE == 0 else I_LO1
    hi_col = I_HI0 if STAGE == 0 else I_HI1
    if tl.max(active.to(tl.int32), 0) > 0:
        lo = tl.load(ist_ptr + rows * 8 + lo_col, mask=active, other=0)
        hi = tl.load(ist_ptr + rows * 8 + hi_col, mask=active, other=0)
        piv = _pivots(lo, hi, P)
        x0, inv_t = _row_stats(cmax_ptr, temp_ptr, rows, rmask, SC, NSC)
        cnt = tl.zeros([BLOCK_B, P], tl.int32)
        mass = tl.zeros([BLOCK_B, P], tl.float32)
        n_up = tl.zeros([BLOCK_B], tl.int32)
        m_up = tl.zeros([BLOCK_B], tl.float32)
        for s in range(0, CHUNK, SUB):
            cols = chunk * CHUNK + s + tl.arange(0, SUB)
            mask = active[:, None] & (cols[None, :] < V)
            x = tl.load(x_ptr + r64[:, None] * stride_b + cols[None, :], mask=mask, other=0.0)
            w = tl.where(mask, tl.exp((x - x0[:, None]) * inv_t[:, None]), -1.0)
            bits = w.to(tl.int32, bitcast=True)  # -1.0 is negative: below every pivot
            up = bits >= hi[:, None]  # at or above every pivot
            n_up += tl.sum(up.to(tl.int32), 1)
            m_up += tl.sum(tl.where(up, w, 0.0), 1)
            inr = (bits >= lo[:, None]) & (bits < hi[:, None])
            if tl.max(tl.max(inr.to(tl.int32), 1), 0) > 0:
                ge = inr[:, None, :] & (bits[:, None, :] >= piv[:, :, None])  # [BB, P, SUB]
                cnt += tl.sum(ge.to(tl.int32), 2)
                mass += tl.sum(tl.where(ge, w[:, None, :], 0.0), 2)
        cnt += n_up[:, None]
        mass += m_up[:, None]
        j = tl.arange(0, P)
        at = (r64[:, None] * S + chunk) * P + j[None, :]
        tl.store(part_c_ptr + at, cnt, mask=active[:, None])
        tl.store(part_m_ptr + at, mass, mask=active[:, None])
    tl.debug_barrier()  # every thread's partials are written before the ticket is taken
    ticket = tl.atomic_add(ticket_ptr + tl.program_id(0), 1, sem="acq_rel")
    if ticket == S - 1:  # the row block's last program: reduce and narrow
        tl.store(ticket_ptr + tl.program_id(0), 0)
        if tl.max(active.to(tl.int32), 0) > 0:
            lo = tl.load(ist_ptr + rows * 8 + lo_col, mask=active, other=0)
            hi = tl.load(ist_ptr + rows * 8 + hi_col, mask=active, other=0)
            _narrow(rows, r64, active, lo, hi, top_k_ptr, ist_ptr, fst_ptr, part_c_ptr,
                    part_m_ptr, S, STAGE, LAST, BLOCK_B, P, NS)  # fmt: skip


def _narrow(rows, r64, active, lo, hi, top_k_ptr, ist_ptr, fst_ptr, part_c_ptr, part_m_ptr,
            S, STAGE: tl.constexpr, LAST: tl.constexpr, BLOCK_B: tl.constexpr, P: tl.constexpr,
            NS: tl.constexpr):  # fmt: skip
    """The streaming ``_bisect`` step on the row totals; on the stage's last pass, its result."""
    c = tl.arange(0, NS)
    j = tl.arange(0, P)
    at = (r64[:, None, None] * S + c[None, :, None]) * P + j[None, None, :]
    m3 = active[:, None, None] & (c[None, :, None] < S)
    cnt = tl.sum(tl.load(part_c_ptr + at, mask=m3, other=0, cache_modifier=".cg"), 1)
    mass = tl.sum(tl.load(part_m_ptr + at, mask=m3, other=0.0, cache_modifier=".cg"), 1)
    piv = _pivots(lo, hi, P)
    cnt_col = I_CNT0 if STAGE == 0 else I_CNT1
    mass_col = F_MASS0 if STAGE == 0 else F_MASS1
    cnt_hi = tl.load(ist_ptr + rows * 8 + cnt_col, mask=active, other=0)
    mass_hi = tl.load(fst_ptr + rows * 8 + mass_col, mask=active, other=0.0)
    if STAGE == 0:
        k = tl.load(top_k_ptr + rows, mask=active, other=1)
        ok = cnt >= k[:, None]
    else:
        target = tl.load(fst_ptr + rows * 8 + F_TARGET, mask=active, other=0.0)
        ok = mass >= target[:, None]
    lo, hi, cnt_hi, mass_hi = _narrow_bounds(piv, ok, cnt, mass, lo, hi, cnt_hi, mass_hi)
    tl.store(ist_ptr + rows * 8 + (I_LO0 if STAGE == 0 else I_LO1), lo, mask=active)
    tl.store(ist_ptr + rows * 8 + (I_HI0 if STAGE == 0 else I_HI1), hi, mask=active)
    tl.store(ist_ptr + rows * 8 + cnt_col, cnt_hi, mask=active)
    tl.store(fst_ptr + rows * 8 + mass_col, mass_hi, mask=active)
    if LAST:
        t = lo.to(tl.float32, bitcast=True)
        if STAGE == 0:  # top-k: tk, the kept ties r_k, the top-k mass; top-p starts at tk
            r_k = k - cnt_hi
            zk = mass_hi + r_k.to(tl.float32) * t
            top_p = tl.load(fst_ptr + rows * 8 + F_TOP_P, mask=active, other=1.0)
            tl.store(fst_ptr + rows * 8 + F_TARGET, top_p * zk, mask=active)
            tl.store(fst_ptr + rows * 8 + F_TK, t, mask=active)
            tl.store(ist_ptr + rows * 8 + I_RK, r_k, mask=active)
            tl.store(ist_ptr + rows * 8 + I_LO1, tl.maximum(t, 0.0).to(tl.int32, bitcast=True),
                     mask=active)  # fmt: skip
        else:
            tl.store(fst_ptr + rows * 8 + F_TP, t, mask=active)
            tl.store(fst_ptr + rows * 8 + F_MGP, mass_hi, mask=active)


def _finish(x_ptr, stride_b, temp_ptr, min_p_ptr, seed_ptr, offset_ptr, cmax_ptr, ist_ptr,
            fst_ptr, cm_ptr, ek_ptr, ep_ptr, ticket_ptr, out_ptr, B, V, S, SC,
            BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, NS: tl.constexpr,
            NSC: tl.constexpr):  # fmt: skip
    """Per chunk: the kept mass of tokens not tied at ``tk`` / ``tp`` and the tie counts; the
    row block's last program places the ties, picks the chunk and draws in it."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    chunk = tl.program_id(1)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    pend = tl.load(ist_ptr + rows * 8 + I_PEND, mask=rmask, other=0)
    active = rmask & ((pend & PEND_ANY) != 0)
    if tl.max(active.to(tl.int32), 0) > 0:
        x0, inv_t = _row_stats(cmax_ptr, temp_ptr, rows, rmask, SC, NSC)
        tk = tl.load(fst_ptr + rows * 8 + F_TK, mask=active, other=-1.0)
        tp = tl.load(fst_ptr + rows * 8 + F_TP, mask=active, other=-1.0)
        floor_m = tl.load(min_p_ptr + rows, mask=active, other=0.0)  # p_max = exp(0) = 1
        mass = tl.zeros([BLOCK_B], tl.float32)
        n_k = tl.zeros([BLOCK_B], tl.int32)
        n_p = tl.zeros([BLOCK_B], tl.int32)
        for s in range(0, CHUNK, SUB):
            cols = chunk * CHUNK + s + tl.arange(0, SUB)
            mask = active[:, None] & (cols[None, :] < V)
            x = tl.load(x_ptr + r64[:, None] * stride_b + cols[None, :], mask=mask, other=0.0)
            p = tl.where(mask, tl.exp((x - x0[:, None]) * inv_t[:, None]), -1.0)
            eq_k = p == tk[:, None]
            eq_p = p == tp[:, None]
            plain = (p > tk[:, None]) & (p > tp[:, None]) & (p >= floor_m[:, None]) & (p > 0.0)
            mass += tl.sum(tl.where(plain & ~eq_k & ~eq_p, p, 0.0), 1)
            n_k += tl.sum(eq_k.to(tl.int32), 1)
            n_p += tl.sum(eq_p.to(tl.int32), 1)
        tl.store(cm_ptr + r64 * S + chunk, mass, mask=active)
        tl.store(ek_ptr + r64 * S + chunk, n_k, mask=active)
        tl.store(ep_ptr + r64 * S + chunk, n_p, mask=active)
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + tl.program_id(0), 1, sem="acq_rel")
    if ticket == S - 1:
        tl.store(ticket_ptr + tl.program_id(0), 0)
        if tl.max(active.to(tl.int32), 0) > 0:
            _draw_split(x_ptr, stride_b, temp_ptr, min_p_ptr, seed_ptr, offset_ptr, cmax_ptr,
                        ist_ptr, fst_ptr, cm_ptr, ek_ptr, ep_ptr, out_ptr, rows, r64, rmask,
                        active, V, S, SC, BLOCK_B, CHUNK, SUB, NS, NSC)  # fmt: skip


def _draw_split(x_ptr, stride_b, temp_ptr, min_p_ptr, seed_ptr, offset_ptr, cmax_ptr, ist_ptr,
                fst_ptr, cm_ptr, ek_ptr, ep_ptr, out_ptr, rows, r64, rmask, active, V, S, SC,
                BLOCK_B: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                NS: tl.constexpr, NSC: tl.constexpr):  # fmt: skip
    x0, inv_t = _row_stats(cmax_ptr, temp_ptr, rows, rmask, SC, NSC)
    tk = tl.load(fst_ptr + rows * 8 + F_TK, mask=active, other=-1.0)
    tp = tl.load(fst_ptr + rows * 8 + F_TP, mask=active, other=-1.0)
    r_k = tl.load(ist_ptr + rows * 8 + I_RK, mask=active, other=0)
    mass_gt_p = tl.load(fst_ptr + rows * 8 + F_MGP, mask=active, other=0.0)
    target_p = tl.load(fst_ptr + rows * 8 + F_TARGET, mask=active, other=0.0)
    floor_m = tl.load(min_p_ptr + rows, mask=active, other=0.0)
    c = tl.arange(0, NS)
    cmask = active[:, None] & (c[None, :] < S)
    cm = tl.load(cm_ptr + r64[:, None] * S + c[None, :], mask=cmask, other=0.0,
                 cache_modifier=".cg")  # fmt: skip
    ek = tl.load(ek_ptr + r64[:, None] * S + c[None, :], mask=cmask, other=0,
                 cache_modifier=".cg")  # fmt: skip
    ep = tl.load(ep_ptr + r64[:, None] * S + c[None, :], mask=cmask, other=0,
                 cache_modifier=".cg")  # fmt: skip
    ek_before = tl.cumsum(ek, 1) - ek
    ep_before = tl.cumsum(ep, 1) - ep
    # the kept ties: a prefix (in id order) of the tokens equal to tk, and of those equal to
    # tp: r_k of tk's (kept only when tk is also above tp: top-p off), and the tp's whose mass
    # before stays below the target (the streaming kernel's test, per rank)
    p_on = tp >= 0.0
    tie_ok_k = (tk >= floor_m) & (tk > 0.0) & ((tk > tp) | (tk == tp))
    tie_ok_p = p_on & (tp >= floor_m) & (tp > 0.0) & (tp > tk)
    n_kp = _ties_below_target(mass_gt_p, tp, target_p, tl.sum(ep, 1))
    keep_k = tl.where(tk == tp, tl.minimum(r_k, n_kp), r_k)
    kk = tl.minimum(tl.maximum(keep_k[:, None] - ek_before, 0), ek)
    kp = tl.minimum(tl.maximum(n_kp[:, None] - ep_before, 0), ep)
    mass_c = cm + tl.where(tie_ok_k[:, None], kk.to(tl.float32) * tk[:, None], 0.0)
    mass_c += tl.where(tie_ok_p[:, None], kp.to(tl.float32) * tp[:, None], 0.0)
    mass_c = tl.where(cmask, mass_c, 0.0)
    cdf = tl.cumsum(mass_c, 1)
    z = tl.sum(mass_c, 1)
    seed = tl.load(seed_ptr + rows, mask=active, other=0)
    offset = tl.load(offset_ptr + rows, mask=active, other=0)
    goal = _counter_uniform(seed, offset) * z
    hit = tl.min(tl.where(cmask & (cdf > goal[:, None]), c[None, :], NS), 1)
    last = tl.max(tl.where(cmask & (mass_c > 0.0), c[None, :], -1), 1)
    pick = tl.where(hit < NS, hit, tl.maximum(last, 0))
    at_pick = c[None, :] == pick[:, None]
    run = tl.sum(tl.where(at_pick, cdf - mass_c, 0.0), 1)  # mass before the picked chunk
    seen_k = tl.sum(tl.where(at_pick, ek_before, 0), 1)
    seen_p = tl.sum(tl.where(at_pick, ep_before, 0), 1)
    found = tl.zeros([BLOCK_B], tl.int32) - 1
    last_id = tl.zeros([BLOCK_B], tl.int32) - 1
    for s in range(0, CHUNK, SUB):
        cols = pick[:, None] * CHUNK + s + tl.arange(0, SUB)[None, :]
        mask = active[:, None] & (cols < V)
        x = tl.load(x_ptr + r64[:, None] * stride_b + cols, mask=mask, other=0.0)
        p = tl.where(mask, tl.exp((x - x0[:, None]) * inv_t[:, None]), -1.0)
        keep, seen_k, seen_p = _kept(p, cols, tk, r_k, tp, mass_gt_p, target_p, floor_m,
                                     seen_k, seen_p)  # fmt: skip
        w = tl.where(keep, p, 0.0)
        cdf_in = run[:, None] + tl.cumsum(w, 1)
        h = tl.min(tl.where(keep & (cdf_in > goal[:, None]), cols, 0x7FFFFFFF), 1)
        found = tl.where((found < 0) & (h < 0x7FFFFFFF), h, found)
        last_id = tl.maximum(last_id, tl.max(tl.where(keep, cols, -1), 1))
        run += tl.sum(w, 1)
    token = tl.where(found >= 0, found, last_id)
    token = tl.minimum(tl.maximum(token, 0), V - 1)
    tl.store(out_ptr + rows, token.to(tl.int64), mask=active)


def _ties_below_target(mass_gt_p, tp, target_p, n_eq):
    """How many tokens equal to ``tp`` the top-p cut keeps: the ranks ``j`` with ``mass_gt_p +
    tp * j < target_p`` (the streaming ``_kept`` test), at most ``n_eq``."""
    est = tl.where(tp > 0.0, tl.ceil((target_p - mass_gt_p) / tp), 0.0)
    n = tl.minimum(tl.maximum(est, 0.0), n_eq.to(tl.float32)).to(tl.int32)
    # the division rounds: settle the boundary with the test itself
    n = tl.where((n < n_eq) & (mass_gt_p + tp * n.to(tl.float32) < target_p), n + 1, n)
    n = tl.where((n > 0) & ~(mass_gt_p + tp * (n - 1).to(tl.float32) < target_p), n - 1, n)
    return n


@dataclass(frozen=True, slots=True)
class SplitPlan:
    """Grid and tiles of the split path for ``rows x vocab`` (its own chunks: about 64 per
    row, 64..2048 logits each; the candidate path's chunks are finer when K is large)."""

    rows: int
    chunk: int
    num_chunks: int
    ns: int  # num_chunks padded to a power of two
    pivots: int
    sub: int  # logits per inner step: the pivot tile is [BLOCK_B, pivots, sub]
    block_b: int
    grid_b: int

    @staticmethod
    def for_shape(rows: int, vocab: int, pivots: int, block_b: int) -> SplitPlan:
        import triton

        chunk = min(2048, max(64, triton.next_power_of_2(triton.cdiv(vocab, 64))))
        num_chunks = triton.cdiv(vocab, chunk)
        sub = min(chunk, max(16, 4096 // pivots))
        return SplitPlan(rows, chunk, num_chunks, triton.next_power_of_2(num_chunks), pivots,
                         sub, block_b, triton.cdiv(rows, block_b))  # fmt: skip


class SplitScratch:
    """Device buffers of the split path (allocated per call, like the candidate path's; under
    a CUDA graph they live in its pool). Every launch's last program resets its ticket."""

    def __init__(self, plan: SplitPlan, device) -> None:
        rows, chunks, pivots = plan.rows, plan.num_chunks, plan.pivots
        self.ist = torch.empty(rows, I_COLS, dtype=torch.int32, device=device)
        self.fst = torch.empty(rows, F_COLS, dtype=torch.float32, device=device)
        self.part_c = torch.empty(rows * chunks * pivots, dtype=torch.int32, device=device)
        self.part_m = torch.empty(rows * chunks * pivots, dtype=torch.float32, device=device)
        self.chunk_mass = torch.empty(rows, chunks, dtype=torch.float32, device=device)
        self.eq_k = torch.empty(rows, chunks, dtype=torch.int32, device=device)
        self.eq_p = torch.empty(rows, chunks, dtype=torch.int32, device=device)
        self.tickets = torch.zeros(plan.grid_b, dtype=torch.int32, device=device)


def search_iters(pivots: int) -> int:
    """Bisection passes per stage: ``ceil(30 / log2(P)) + 1`` (bit patterns of [0, 1] lie
    below 2^30; the streaming kernel's count)."""
    return -(-30 // (pivots.bit_length() - 1)) + 1


def launch_split(logits, temperature, top_k, min_p, seed, offset, cmax, stats_chunks: int,
                 scratch: SplitScratch, out, plan: SplitPlan, *, stages=(True, True),
                 warps: int = 4) -> None:  # fmt: skip
    """The split path's launches after the candidate ``_draw`` marked the pending rows in
    ``scratch.ist``; writes their tokens into ``out``. ``cmax``: the candidate path's
    ``[B, stats_chunks]`` chunk maxima. ``stages``: launch the top-k / top-p searches (the
    draw defers no row needing a search that is not launched). Graph-safe."""
    import triton

    built = _kernels()
    rows, vocab = logits.shape
    grid = (plan.grid_b, plan.num_chunks)
    iters = search_iters(plan.pivots)
    nsc = triton.next_power_of_2(stats_chunks)
    common = dict(BLOCK_B=plan.block_b, CHUNK=plan.chunk, SUB=plan.sub, NS=plan.ns, NSC=nsc,
                  num_warps=warps)  # fmt: skip
    for stage in (0, 1):
        if not stages[stage]:
            continue
        for it in range(iters):
            built["search"][grid](
                logits, logits.stride(0), temperature, top_k, cmax, scratch.ist, scratch.fst,
                scratch.part_c, scratch.part_m, scratch.tickets, rows, vocab, plan.num_chunks,
                stats_chunks, STAGE=stage, LAST=it == iters - 1, P=plan.pivots, **common,
            )  # fmt: skip
    built["finish"][grid](
        logits, logits.stride(0), temperature, min_p, seed, offset, cmax, scratch.ist,
        scratch.fst, scratch.chunk_mass, scratch.eq_k, scratch.eq_p, scratch.tickets, out,
        rows, vocab, plan.num_chunks, stats_chunks, **common,
    )  # fmt: skip
