"""Selection engine costs on the CPU: a cached ``select`` lookup and a cold selection (a new
context through every candidate's constraints, the policy and the scoring).

Targets from the selection issue: cached lookup <= 2 us, cold selection <= 200 us.

    python bench/bench_selection.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write_result  # noqa: E402

from layerzero_serve.kernels.spec import KernelContext, Op  # noqa: E402
from layerzero_serve.selection import FAKE_DEVICES, BackendState, Selector  # noqa: E402
from layerzero_serve.selection.plans import ModelShape, base_context  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    avail = {
        b: BackendState(True, "x", "")
        for b in ("torch", "triton", "flashinfer", "flash_attn", "xformers", "liger_kernel")
    }
    sel = Selector(backends=avail)  # the real registry, every backend "available"
    shape = ModelShape("bfloat16", 128, 32, 8, 128256)
    dev = FAKE_DEVICES["h100"]
    ctx = base_context(
        Op.ATTN_DECODE,
        device=dev,
        shape=shape,
        block_size=16,
        batch_bucket=64,
        q_len=1,
        graph_mode=True,
    )
    sel.select(ctx.op, ctx)
    n = 100_000
    laps = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n):
            sel.select(ctx.op, ctx)
        laps.append((time.perf_counter() - t0) / n)
    cached = statistics.median(laps)
    cold = []
    for b in range(1, 2001):  # distinct contexts: each is a cold decision
        c = base_context(
            Op.ATTN_DECODE,
            device=dev,
            shape=shape,
            block_size=16,
            batch_bucket=b,
            q_len=1,
            graph_mode=True,
        )
        t0 = time.perf_counter()
        sel.select(c.op, c)
        cold.append(time.perf_counter() - t0)
    res = {
        "cached_select_us": cached * 1e6,
        "cold_select_us_median": statistics.median(cold) * 1e6,
        "num_candidates": len(sel.kernels(Op.ATTN_DECODE)),
        "targets_us": {"cached": 2.0, "cold": 200.0},
    }
    ctx_hash = KernelContext(Op.ATTN_DECODE)
    t0 = time.perf_counter()
    for _ in range(n):
        hash(ctx_hash)
    res["context_hash_us"] = (time.perf_counter() - t0) / n * 1e6
    print(res)
    print("wrote", write_result("selection_cpu", res, args.out))


if __name__ == "__main__":
    main()
