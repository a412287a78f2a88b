"""Sizes and grids of :func:`~layerzero_serve.kernels._triton.topk_sampling.triton_sample_logits`
(host only): the candidate count, the split path's dispatch and the launch plan for a shape."""

from __future__ import annotations

from dataclasses import dataclass

from layerzero_serve.kernels._triton import sampling as streaming

K_DEFAULT = 256  # candidates per row on a GPU: top_k <= 256 (20, 50, gpt-fast's 200) is
# decided on them, at batch 1 and 256 alike
K_INTERPRETER = 64  # the interpreter's candidates come from K max-extractions: fewer
SPLIT_MAX_ROWS = 8  # up to this many rows the split path beats one program per row
CAP_DEFAULT = 1024  # logits >= tau kept per row (typically ~100); more: that row streams


def _sizes(num_candidates, capacity, pivots, interp: bool) -> tuple[int, int]:
    """``(K, pivots)``: the defaults filled in, each checked (ValueError naming it)."""
    k = num_candidates or (K_INTERPRETER if interp else K_DEFAULT)
    pivots = pivots or (16 if interp else 64)
    for name, value, low in (("num_candidates", k, 2), ("pivots", pivots, 2)):
        if value < low or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= {low}, got {value}")
    if capacity < k or capacity & (capacity - 1):
        raise ValueError(f"capacity must be a power of two >= num_candidates, got {capacity}")
    return k, pivots


@dataclass(frozen=True, slots=True)
class _LaunchPlan:
    chunk: int
    num_chunks: int
    ns: int  # chunk maxima per row, padded to a power of two >= K
    use_tau: bool  # at least K chunks: tau bounds the candidates
    block_b: int
    grid_b: int
    method: int  # _top_keys METHOD
    warps: int
    split: int  # the streaming fallback's SPLIT, BLOCK_V and ITERS
    block_v: int
    iters: int


def _launch_plan(rows: int, vocab: int, k: int, capacity: int, chunk: int | None,
                 has_topk: bool) -> _LaunchPlan:  # fmt: skip
    """Grid and tile sizes of :func:`triton_sample_logits` for this shape."""
    import triton

    interp = streaming._interpreting()
    if chunk is None:  # at least K chunks where the vocabulary allows: a useful tau
        chunk = min(2048, max(64, 1 << max(0, (vocab // k).bit_length() - 1)))
    if chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    num_chunks = triton.cdiv(vocab, chunk)
    ns = max(triton.next_power_of_2(num_chunks), k)
    split, block_v, iters = streaming.streaming_params(vocab, interp)
    # The interpreter pays per tile op, not per element: as many rows per program as the
    # largest tile ([rows, K, K], [rows, CAP], [rows, SPLIT, BLOCK_V]) allows there.
    widest = max(k * k, chunk, capacity, ns, split * block_v)
    block_b = min(triton.next_power_of_2(rows), max(1, (1 << 20) // widest)) if interp else 1
    method = 2 if interp else (0 if has_topk else 1)
    return _LaunchPlan(chunk, num_chunks, ns, num_chunks >= k, block_b,
                       triton.cdiv(rows, block_b), method, 1 if interp else 8, split, block_v,
                       iters)  # fmt: skip
