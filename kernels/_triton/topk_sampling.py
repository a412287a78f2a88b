"""Sampling straight from logits: exact top-K candidates, then filters and the draw on those
candidates (no softmax over the vocabulary, no sort of it).

``triton_sample_logits(logits, temperature, top_k, top_p, min_p, seed, offset) -> int64 [B]``
draws with the semantics and random numbers of :mod:`layerzero_serve.kernels.sampling_api`
from ``softmax(logits / temperature)``. Four launches, the logits read twice:

1. ``_chunk_stats`` (grid ``B x S`` chunks): each chunk's max logit and softmax partial sum.
2. ``_threshold`` (grid ``B``): ``tau``, the K-th largest chunk maximum. Those K maxima are K
   distinct logits, so every one of the row's first K tokens has ``x >= tau``.
3. ``_compact`` (grid ``B x S``): logits ``>= tau`` are appended, as unique int64 keys
   ``(order-preserving bits of x) << 32 | (2^31 - 1 - id)``, to the row's candidate list
   (typically ~100 entries for 128k logits). Keys sort by descending logit and, among equal
   logits, ascending id: the ranking's tie rule, so ties at tau or at any cut are exact.
4. ``_draw`` (grid ``B``): the K largest candidate keys are the first K tokens of the ranking.
   When ``top_k <= K``, or when top-k is off and the top-p prefix closes within those K (its
   mass reaches ``top_p`` of the full softmax mass, known from the partials), every filter is
   decided on them: top-k by rank, top-p by the mass before each rank, min-p against the best
   weight; then the inverse CDF in token-id order with ``counter_uniform(seed, offset)``
   (a sort by id and a prefix sum; pairwise sums in the interpreter). Any other row (top-k
   above K, plain sampling, a wide top-p, a candidate list past its capacity) is decided by
   the split path (:mod:`~layerzero_serve.kernels._triton.split_sampling`: every pass of the
   threshold bisection spread over the row's chunks) at small batch or when no search is
   needed, else streamed through the bisection kernel of
   :mod:`~layerzero_serve.kernels._triton.sampling` in its own program.

Host hints (``SamplingHints``, from the sampler's plan) leave out the launches a batch cannot
need: the candidates when no row has top-k, top-p or greedy; each search when no row needs it.

Position-invariant (a row's token depends on its logits, parameters, seed and offset only; the
atomic append order does not matter, the keys are ranked) and graph-safe (no host
synchronisation; grids depend on shapes only). Rows whose logits hold NaN or +inf, or are all
-inf, return some token in ``[0, V)``; the sampler flags those rows and discards it.
"""

from __future__ import annotations

import torch

from layerzero_serve.kernels._triton import sampling as streaming
from layerzero_serve.kernels._triton import split_sampling
from layerzero_serve.kernels._triton.topk_launch import (
    CAP_DEFAULT,
    SPLIT_MAX_ROWS,
    _launch_plan,
    _sizes,
)
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op

__all__ = ["SPECS", "TritonTopKSamplingKernel", "triton_sample_logits"]

tl = None
_counter_uniform = _sample_rows = None  # the streaming module's jitted helpers, set on first use
_JIT_NAMES = (
    "_top_keys",
    "_draw_candidates",
    "_sortable",
    "_decode_keys",
    "_chunk_stats",
    "_threshold",
    "_compact",
    "_draw",
)
_built: dict = {}


def _kernels():
    if not _built:
        import triton
        import triton.language

        g = globals()
        g["tl"] = triton.language
        streaming._kernel()  # decorates the streaming kernel's helpers, used by the slow path
        for name in ("_counter_uniform", "_sample_rows"):
            g[name] = getattr(streaming, name)
        for name in _JIT_NAMES:
            g[name] = triton.jit(g[name])
        for name in ("_chunk_stats", "_threshold", "_compact", "_draw"):
            _built[name.strip("_")] = g[name]
        _built["has_topk"] = hasattr(triton.language, "topk")
    return _built


def _top_keys(keys, BLOCK_B: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
              METHOD: tl.constexpr):  # fmt: skip
    """The ``K`` largest of each row's ``N`` unique int64 keys (``[BLOCK_B, N]`` ->
    ``[BLOCK_B, K]``), in descending order (``K`` divides ``N``). METHOD 0: ``tl.topk``; 1:
    ``tl.sort`` (Triton without topk); 2: K max-extractions (the interpreter, whose sort runs a
    Python callback per element)."""
    if METHOD == 0:
        top = tl.topk(keys, K)
    elif METHOD == 1:
        ranked = tl.reshape(tl.sort(keys, descending=True), [BLOCK_B, N // K, K])
        first = tl.arange(0, N // K)[None, :, None] == 0
        top = tl.sum(tl.where(first, ranked, 0), 1)
    else:
        rank = tl.arange(0, K)[None, :]
        top = tl.zeros([BLOCK_B, K], tl.int64)
        for i in range(K):
            best = tl.max(keys, 1)
            top = tl.where(rank == i, best[:, None], top)
            keys = tl.where(keys == best[:, None], -9223372036854775807 - 1, keys)
    return top


def _sortable(x):
    """int32 bits of float32 ``x`` whose signed order is the float order (keys' high word)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _decode_keys(keys):
    """(logit float32, token id int32) of each key."""
    hi = (keys >> 32).to(tl.int32)
    bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    ids = 0x7FFFFFFF - (keys & 0xFFFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True), ids


def _chunk_stats(x_ptr, stride_b, temp_ptr, cmax_ptr, csum_ptr, count_ptr, B, V, S,
                 BLOCK_B: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """Per chunk: the max logit and ``sum(exp((x - max) / T))``; chunk 0 also zeroes the row's
    candidate count (this launch precedes every append to it)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = rmask[:, None] & (cols[None, :] < V)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_b + cols[None, :], mask=mask,
                other=float("-inf"))  # fmt: skip
    inv_t = 1.0 / tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    m = tl.max(x, 1)
    s = tl.sum(tl.exp((x - m[:, None]) * inv_t[:, None]), 1)
    s = tl.where(m == float("-inf"), 0.0, s)  # an all -inf chunk adds nothing
    tl.store(cmax_ptr + rows * S + chunk, m, mask=rmask)
    tl.store(csum_ptr + rows * S + chunk, s, mask=rmask)
    zero = tl.zeros([BLOCK_B], tl.int32)
    tl.store(count_ptr + rows, zero, mask=rmask & (zero + chunk == 0))


def _threshold(cmax_ptr, tau_ptr, B, S, BLOCK_B: tl.constexpr, NS: tl.constexpr,
               K: tl.constexpr, METHOD: tl.constexpr):  # fmt: skip
    """``tau``: the K-th largest chunk maximum. The K largest chunk maxima are K distinct
    logits, so the row's K-th largest logit is >= tau: the first K tokens of the ranking all
    have ``x >= tau`` (needs ``S >= K``)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    c = tl.arange(0, NS)
    cmask = rmask[:, None] & (c[None, :] < S)
    m = tl.load(cmax_ptr + rows[:, None] * S + c[None, :], mask=cmask, other=float("-inf"))
    keys = (_sortable(m).to(tl.int64) << 32) | c[None, :].to(tl.int64)  # unique per row
    keys = tl.where(cmask, keys, -9223372036854775807 - 1)
    top = _top_keys(keys, BLOCK_B, NS, K, METHOD)
    tau, _ = _decode_keys(tl.min(top, 1))
    tl.store(tau_ptr + rows, tau, mask=rmask)


def _compact(x_ptr, stride_b, tau_ptr, count_ptr, cand_ptr, B, V, CAP, BLOCK_B: tl.constexpr,
             CHUNK: tl.constexpr, USE_TAU: tl.constexpr):  # fmt: skip
    """Append the keys of the chunk's logits ``>= tau`` (finite) to the row's candidate list
    (an atomic counter gives each chunk its range; the order does not matter, the keys are
    ranked later). Keys past ``CAP`` are dropped; the count still says how many there were."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    cols = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = rmask[:, None] & (cols[None, :] < V)
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_b + cols[None, :], mask=mask,
                other=float("-inf"))  # fmt: skip
    if USE_TAU:
        tau = tl.load(tau_ptr + rows, mask=rmask, other=float("inf"))
        survive = mask & (x >= tau[:, None]) & (x > float("-inf"))
    else:
        survive = mask & (x > float("-inf"))
    n = tl.sum(survive.to(tl.int32), 1)
    start = tl.atomic_add(count_ptr + rows, n, mask=rmask & (n > 0))
    pos = start[:, None] + tl.cumsum(survive.to(tl.int32), 1) - 1
    keys = (_sortable(x).to(tl.int64) << 32) | (0x7FFFFFFF - cols[None, :]).to(tl.int64)
    dst = cand_ptr + rows.to(tl.int64)[:, None] * CAP + pos
    tl.store(dst, keys, mask=survive & (pos < CAP))


def _draw(x_ptr, stride_b, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, offset_ptr,
          cand_ptr, count_ptr, cmax_ptr, csum_ptr, out_ptr, ist_ptr, fst_ptr, B, V, S,
          BLOCK_B: tl.constexpr, CAP: tl.constexpr, NS: tl.constexpr, K: tl.constexpr,
          METHOD: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT: tl.constexpr,
          ITERS: tl.constexpr, DEFER: tl.constexpr, CANDS: tl.constexpr,
          TOPK_SEARCH: tl.constexpr, TOPP_SEARCH: tl.constexpr):  # fmt: skip
    """Rows decided on the candidates get their token; with DEFER the others are handed to the
    split path when the searches they need are launched (TOPK_SEARCH / TOPP_SEARCH), else, like
    every undecided row without DEFER, streamed here. CANDS False: no candidates were gathered
    (a batch without top-k / top-p rows): every row is undecided."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    r64 = rows.to(tl.int64)
    k = tl.load(top_k_ptr + rows, mask=rmask, other=1)
    top_p = tl.load(top_p_ptr + rows, mask=rmask, other=1.0)
    min_p = tl.load(min_p_ptr + rows, mask=rmask, other=0.0)
    inv_t = 1.0 / tl.load(temp_ptr + rows, mask=rmask, other=1.0)
    seed = tl.load(seed_ptr + rows, mask=rmask, other=0)
    offset = tl.load(offset_ptr + rows, mask=rmask, other=0)
    c = tl.arange(0, NS)
    cmask = rmask[:, None] & (c[None, :] < S)
    cm = tl.load(cmax_ptr + rows[:, None] * S + c[None, :], mask=cmask, other=float("-inf"))
    cs = tl.load(csum_ptr + rows[:, None] * S + c[None, :], mask=cmask, other=0.0)
    x_max = tl.max(cm, 1)  # the row's largest logit
    token = tl.zeros([BLOCK_B], tl.int32)
    exact = rows < 0
    if CANDS:
        token, exact = _draw_candidates(cand_ptr, count_ptr, rows, r64, rmask, k, top_p, min_p,
                                        inv_t, seed, offset, cm, cs, V, BLOCK_B, CAP, K,
                                        METHOD)  # fmt: skip
    undecided = rmask & (exact == 0)
    # the split path needs the searches this row needs; without them it streams here
    defer = undecided
    if not DEFER:
        defer = rows < 0
    if not TOPK_SEARCH:
        defer = defer & (k >= V)
    if not TOPP_SEARCH:
        defer = defer & (top_p >= 1.0)
    if DEFER:  # the state the split path starts from (split_sampling.py's I_* / F_* columns)
        z_row = tl.sum(tl.where(cs > 0, cs * tl.exp((cm - x_max[:, None]) * inv_t[:, None]),
                                0.0), 1)  # fmt: skip
        bits = tl.where(k < V, 1, 0) | tl.where(top_p < 1.0, 2, 0) | 4
        ist = ist_ptr + rows * 8
        fst = fst_ptr + rows * 8
        tl.store(ist, tl.where(defer, bits, 0), mask=rmask)
        zero_i = tl.zeros([BLOCK_B], tl.int32)
        hi0 = zero_i + 0x3F800001  # above the bits of the largest weight, exp(0) = 1
        tl.store(ist + 1, zero_i, mask=defer)  # stage 0 (top-k): lo, hi, count at hi
        tl.store(ist + 2, hi0, mask=defer)
        tl.store(ist + 3, zero_i, mask=defer)
        tl.store(ist + 4, zero_i, mask=defer)  # stage 1 (top-p): lo, hi, count at hi
        tl.store(ist + 5, hi0, mask=defer)
        tl.store(ist + 6, zero_i, mask=defer)
        tl.store(ist + 7, zero_i, mask=defer)  # r_k
        zero_f = tl.zeros([BLOCK_B], tl.float32)
        tl.store(fst + 0, zero_f, mask=defer)  # the stages' masses at hi
        tl.store(fst + 1, zero_f, mask=defer)
        tl.store(fst + 2, zero_f - 1.0, mask=defer)  # tk, tp: off
        tl.store(fst + 3, zero_f - 1.0, mask=defer)
        tl.store(fst + 4, zero_f, mask=defer)  # mass above tp
        tl.store(fst + 5, top_p * z_row, mask=defer)  # top-p target (top-k rows: rescaled)
        tl.store(fst + 6, z_row, mask=defer)
        tl.store(fst + 7, top_p, mask=defer)
    stream = undecided & (defer == 0)
    if tl.max(stream.to(tl.int32), 0) > 0:  # stream the row in this program
        base = x_ptr + r64[:, None] * stride_b
        slow = _sample_rows(base, stream, k, top_p, min_p, seed, offset, x_max, inv_t, V,
                            BLOCK_B, BLOCK_V, SPLIT, ITERS, True)  # fmt: skip
        token = tl.where(stream, slow, token)
    token = tl.minimum(tl.maximum(token, 0), V - 1)  # degenerate rows still index in range
    tl.store(out_ptr + rows, token.to(tl.int64), mask=rmask)


def _draw_candidates(cand_ptr, count_ptr, rows, r64, rmask, k, top_p, min_p, inv_t, seed,
                     offset, cm, cs, V, BLOCK_B: tl.constexpr, CAP: tl.constexpr,
                     K: tl.constexpr, METHOD: tl.constexpr):  # fmt: skip
    """(token, exact): the draw on the row's first K tokens, and whether they decide it."""
    count = tl.load(count_ptr + rows, mask=rmask, other=0)
    j = tl.arange(0, CAP)
    kmask = rmask[:, None] & (j[None, :] < count[:, None])
    keys = tl.load(cand_ptr + r64[:, None] * CAP + j[None, :], mask=kmask,
                   other=-9223372036854775807 - 1)  # fmt: skip
    top = _top_keys(keys, BLOCK_B, CAP, K, METHOD)  # [BB, K]: the ranking's first K tokens
    x, ids = _decode_keys(top)
    valid = top != -9223372036854775807 - 1
    x0 = tl.max(tl.where(valid, x, float("-inf")), 1)  # the candidates' largest logit
    w = tl.where(valid, tl.exp((x - x0[:, None]) * inv_t[:, None]), 0.0)  # rank order
    z_all = tl.sum(tl.where(cs > 0, cs * tl.exp((cm - x0[:, None]) * inv_t[:, None]), 0.0), 1)

    rank = tl.arange(0, K)
    in_k = rank[None, :] < k[:, None]  # all ranks when k > K (top-k off: k == V)
    wk = tl.where(in_k, w, 0.0)
    mass_k = tl.sum(wk, 1)
    z_k = tl.where(k <= K, mass_k, z_all)  # the mass top-p's fraction refers to
    target = top_p * z_k
    before = tl.cumsum(wk, 1) - wk  # mass strictly before each rank
    keep = in_k & ((before < target[:, None]) | (top_p[:, None] >= 1.0))
    keep &= (w >= min_p[:, None]) & (w > 0.0)  # min-p: the best weight is exp(0) = 1
    closes = (top_p < 1.0) & (k >= V) & (mass_k >= target)
    exact = ((k <= K) | closes) & (count <= CAP)

    kw = tl.where(keep, w, 0.0)
    goal = _counter_uniform(seed, offset) * tl.sum(kw, 1)
    last = tl.max(tl.where(keep, ids, -1), 1)
    # inverse CDF in token-id order: the kept mass at ids <= each candidate's id
    if METHOD == 2:  # the interpreter: pairwise (its sort runs a Python callback per element)
        le = ids[:, None, :] <= ids[:, :, None]  # [BB, i, j]: id_j <= id_i
        cdf = tl.sum(tl.where(le, kw[:, None, :], 0.0), 2)
        hit = tl.min(tl.where(keep & (cdf > goal[:, None]), ids, 0x7FFFFFFF), 1)
    else:  # sort (id, weight bits) by id: O(K log^2 K) instead of a K x K tile
        wbits = kw.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        by_id = tl.where(valid, (ids.to(tl.int64) << 32) | wbits, 9223372036854775807)
        by_id = tl.sort(by_id, 1)
        ids_s = (by_id >> 32).to(tl.int32)
        w_s = (by_id & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        w_s = tl.where(by_id != 9223372036854775807, w_s, 0.0)
        cdf = tl.cumsum(w_s, 1)
        hit = tl.min(tl.where((w_s > 0.0) & (cdf > goal[:, None]), ids_s, 0x7FFFFFFF), 1)
    return tl.where(hit < 0x7FFFFFFF, hit, last), exact


def triton_sample_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    num_candidates: int | None = None,
    capacity: int = CAP_DEFAULT,
    chunk: int | None = None,
    split: bool | None = None,
    pivots: int | None = None,
    candidates: bool = True,
    top_k_search: bool = True,
    top_p_search: bool = True,
) -> torch.Tensor:
    """One token per row of ``softmax(logits / temperature)`` after top-k -> top-p -> min-p.

    Args:
        logits: float32 ``[B, V]`` (processed: penalties, bias and masks applied), unit stride
            along V.
        temperature: float32 ``[B]``, > 0.
        top_k, top_p, min_p, seed, offset: as :meth:`SamplingKernel.sample`, ``[B]``.
        num_candidates: ``K``, a power of two (default 256 on a GPU, 64 in the interpreter);
            rows with ``top_k <= K`` are decided on the candidates (unless more than
            ``capacity`` logits reach the row's tau).
        capacity: candidate slots per row (a power of two >= K).
        chunk: logits per program of the per-chunk passes (a power of two; default: the
            largest one leaving at least K chunks, within 64..2048).
        split: the rows the candidates cannot decide go through the split path (every pass
            spread over the row's chunks, :mod:`split_sampling`) or, with False, stream
            through one program per row. Default on a GPU: split up to ``SPLIT_MAX_ROWS`` rows,
            and at any batch when no search is launched (plain / min-p batches: two passes);
            measured: beyond that, one program per row wins once the rows fill the GPU. Never
            by default in the interpreter (which runs programs one at a time).
        pivots: the split path's pivots per bisection pass (a power of two >= 2; default 64
            on a GPU, 16 in the interpreter).
        candidates, top_k_search, top_p_search: launch hints from the caller's host-side
            knowledge of the batch: False promises that no row has ``top_k < V`` or ``top_p <
            1`` (no candidates), no row has ``K < top_k < V`` (no top-k search), no row has
            ``top_p < 1`` (no top-p search), so those launches are skipped. A wrong promise
            costs speed, never correctness: a row whose search was not launched streams.

    Returns int64 ``[B]``. Graph-safe (no host synchronisation; scratch ``[B, capacity]``
    int64 and a few ``[B, S]`` float32).
    """

    num_rows, vocab = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be float32 with unit stride along V, got {logits.dtype}")
    interp = streaming._interpreting()
    k_cand, pivots = _sizes(num_candidates, capacity, pivots, interp)
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    if split is None:  # no search: the split path is two passes over the rows, at any batch
        searches = top_k_search or top_p_search
        split = not interp and (num_rows <= SPLIT_MAX_ROWS or not searches)
    built = _kernels()
    lp = _launch_plan(num_rows, vocab, k_cand, capacity, chunk, built["has_topk"])
    dev, bb, nc = logits.device, lp.block_b, lp.num_chunks
    cmax = torch.empty(num_rows, nc, dtype=torch.float32, device=dev)
    csum = torch.empty(num_rows, nc, dtype=torch.float32, device=dev)
    count = torch.empty(num_rows, dtype=torch.int32, device=dev)
    tau = torch.empty(num_rows, dtype=torch.float32, device=dev)
    cand = torch.empty(num_rows, capacity, dtype=torch.int64, device=dev)
    plan = split_sampling.SplitPlan.for_shape(num_rows, vocab, pivots, bb) if split else None
    scratch = split_sampling.SplitScratch(plan, dev) if split else None
    ist = scratch.ist if split else count  # unused pointers when not split
    fst = scratch.fst if split else cmax
    temperature = temperature.to(torch.float32).contiguous()
    stride = logits.stride(0)
    built["chunk_stats"][(lp.grid_b, nc)](
        logits, stride, temperature, cmax, csum, count, num_rows, vocab, nc,
        BLOCK_B=bb, CHUNK=lp.chunk, num_warps=lp.warps,
    )  # fmt: skip
    if candidates and lp.use_tau:
        built["threshold"][(lp.grid_b,)](
            cmax, tau, num_rows, nc, BLOCK_B=bb, NS=lp.ns, K=k_cand, METHOD=lp.method,
            num_warps=min(lp.warps, 4),
        )  # fmt: skip
    if candidates:
        built["compact"][(lp.grid_b, nc)](
            logits, stride, tau, count, cand, num_rows, vocab, capacity, BLOCK_B=bb,
            CHUNK=lp.chunk, USE_TAU=lp.use_tau, num_warps=lp.warps,
        )  # fmt: skip
    top_k = top_k.to(torch.int32).contiguous()
    min_p = min_p.to(torch.float32).contiguous()
    seed, offset = seed.to(torch.int64).contiguous(), offset.to(torch.int64).contiguous()
    built["draw"][(lp.grid_b,)](
        logits, stride, temperature, top_k, top_p.to(torch.float32).contiguous(), min_p, seed,
        offset, cand, count, cmax, csum, out, ist, fst, num_rows, vocab, nc, BLOCK_B=bb,
        CAP=capacity, NS=lp.ns, K=k_cand, METHOD=lp.method, BLOCK_V=lp.block_v,
        SPLIT=lp.split, ITERS=lp.iters, DEFER=split, CANDS=candidates,
        TOPK_SEARCH=top_k_search, TOPP_SEARCH=top_p_search, num_warps=lp.warps,
    )  # fmt: skip
    if split:
        split_sampling.launch_split(
            logits, temperature, top_k, min_p, seed, offset, cmax, nc, scratch, out, plan,
            stages=(top_k_search, top_p_search), warps=4 if lp.warps > 1 else 1,
        )  # fmt: skip
    return out


class TritonTopKSamplingKernel:
    """``Op.SAMPLING`` from logits (``takes_logits``): the sampler skips its softmax and calls
    :meth:`sample_logits`; :meth:`sample` serves callers that hold probabilities."""

    name = "triton.topk_sampling"
    position_invariant = True
    takes_logits = True
    takes_hints = True
    #: ``None``: the launch plan decides whether undecided rows take the split path; ``False``
    #: keeps them in one program per row (the benchmarks' baseline for the split path).
    split: bool | None = None

    def __init__(self, ctx: KernelContext | None = None) -> None:
        self.ctx = ctx

    def sample_logits(self, logits, temperature, top_k, top_p, min_p, seed, offset, hints=None):
        """``hints`` (a ``sampling_api.SamplingHints``): launches the batch cannot need are
        skipped (no candidates without top-k / top-p / greedy rows; no top-k search without
        a top-k above ``NARROW_TOP_K``; no top-p search without top-p)."""
        kw: dict = {"split": self.split}
        if hints is not None:
            kw.update(candidates=hints.top_k or hints.top_p or hints.greedy,
                      top_k_search=hints.wide_top_k, top_p_search=hints.top_p)  # fmt: skip
        return triton_sample_logits(logits, temperature, top_k, top_p, min_p, seed, offset, **kw)

    def sample(self, probs, top_k, top_p, min_p, seed, offset) -> torch.Tensor:
        # log p is a logit vector of the same distribution at temperature 1
        ones = torch.ones(probs.shape[0], dtype=torch.float32, device=probs.device)
        return triton_sample_logits(probs.log(), ones, top_k, top_p, min_p, seed, offset)


def _factory(ctx: KernelContext) -> TritonTopKSamplingKernel:
    return TritonTopKSamplingKernel(ctx)


SPECS = [
    KernelSpec(
        "triton.topk_sampling",
        Op.SAMPLING,
        "triton",
        priority=110,
        graph_safe=True,
        device_types=frozenset({"cuda"}),
        min_sm=70,
        factory=_factory,
        doc="kernels/_triton/topk_sampling.py: from logits, exact top-256 candidates per row "
        "(one read of the logits), filters and an inverse-CDF draw on them; other rows through "
        "the split path (threshold bisection spread over the row's chunks) or triton.sampling's "
        "bisection; position-invariant, no host sync",
    ),
]
