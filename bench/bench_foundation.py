"""Host-side costs of the foundation (CPU): block allocate+free, prefix hashing, and one
scheduler step (schedule + update) with 256 running decode requests and a null model.

Targets from the foundation issue: <= 1 us per block for allocate+free, <= 100 ns per token for
SHA-256 over 16-token blocks, <= 300 us per step at 256 requests.

    python bench/bench_foundation.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import median_time, write_result  # noqa: E402

from layerzero_serve.kv_cache import KVCacheManager  # noqa: E402
from layerzero_serve.kv_cache._block_pool import BlockPool  # noqa: E402
from layerzero_serve.kv_cache._hashing import hash_full_blocks, resolve_hash_fn  # noqa: E402
from layerzero_serve.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from layerzero_serve.types import Request  # noqa: E402


def bench_alloc_free(num_blocks: int = 65_536, batch: int = 16) -> dict:
    """Allocate ``batch`` blocks and free them, over the whole pool, per block."""
    pool = BlockPool(num_blocks + 1)
    rounds = num_blocks // batch

    def run() -> None:
        held = [pool.allocate(batch) for _ in range(rounds)]
        for blocks in held:
            pool.free(reversed(blocks))

    t = median_time(run)
    return {"per_block_us": t / (rounds * batch) * 1e6, "batch": batch, "target_us": 1.0}


def bench_hash(algo: str, block_size: int = 16, num_tokens: int = 65_536) -> dict:
    fn, root, _ = resolve_hash_fn(algo)
    rng = random.Random(0)
    toks = [rng.randrange(128_000) for _ in range(num_tokens)]
    n_blocks = num_tokens // block_size
    t = median_time(lambda: hash_full_blocks(fn, root, toks, block_size, 0, n_blocks))
    return {"per_token_ns": t / num_tokens * 1e9, "block_size": block_size, "target_ns": 100.0}


def bench_scheduler_step(
    num_requests: int = 256, steps: int = 2000, freeze_gc: bool = True
) -> dict:
    """Steady-state decode: every request runs one token per step; the null model returns a
    fixed token. Prompts of 100 tokens, so a block fills every 16 steps (commit cost included).

    ``freeze_gc`` moves start-up objects out of the cyclic collector's reach (``gc.freeze()``),
    as the Engine does after start-up; without it, collector passes over the block pool's
    objects add a noisy share to the step time (reported separately)."""
    kv = KVCacheManager(num_requests * 160 + 1, 16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_requests, max_model_len=8192), kv)
    for i in range(num_requests):
        prompt = [(i * 7 + j) % 32000 for j in range(100)]
        sched.add_request(Request(f"r{i}", prompt, max_tokens=10_000))
    null = [7]
    gc.collect()
    if freeze_gc:
        gc.freeze()
    while len(sched.running) < num_requests or sched.waiting:  # prefill everyone
        out = sched.schedule()
        sched.update(out, [null if c.samples else [] for c in out.chunks])

    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        sched.update(out, [null] * len(out.requests))
        times.append(time.perf_counter() - t0)
    gc.unfreeze()
    times.sort()
    return {
        # Mean = amortized cost, including the step in 16 where every request fills a block
        # (SHA-256 commit + a new block): the figure the target applies to.
        "per_step_us": statistics.fmean(times) * 1e6,
        "median_us": statistics.median(times) * 1e6,
        "p10_us": times[len(times) // 10] * 1e6,
        "p90_us": times[len(times) * 9 // 10] * 1e6,
        "steps": steps,
        "num_requests": num_requests,
        "gc_frozen": freeze_gc,
        "target_us": 300.0,
    }


def bench_block_table(num_seqs: int = 256, blocks_per_seq: int = 128) -> dict:
    """Host cost of one step's block table for a decode batch (256 x 128 blocks: batch 256 at
    context 2048 with 16-token blocks), from the scheduler's per-request block id lists: a full
    rebuild, and the runner's BlockTableCache in steady decoding."""
    from layerzero_serve.kv_cache import build_block_table
    from layerzero_serve.kv_cache._storage import BlockTableCache

    ids = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(num_seqs)]
    full = median_time(lambda: build_block_table(ids))
    cache, step = BlockTableCache(), [0]

    def cached_step() -> None:  # steady decoding: each row gains a block every 16 steps
        step[0] += 1
        if step[0] % 16 == 0:
            for row in ids:
                row.append(row[-1] + 1_000_000)
        cache.build(ids, 0)

    return {
        "per_step_us": full * 1e6,
        "cached_per_step_us": median_time(cached_step) * 1e6,
        "num_seqs": num_seqs,
        "blocks_per_seq": blocks_per_seq,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args()
    res = {
        "alloc_free": bench_alloc_free(),
        "hash_sha256": bench_hash("sha256"),
        "hash_fast": bench_hash("fast"),
        "scheduler_step_256": bench_scheduler_step(),
        "scheduler_step_256_gc_unfrozen": bench_scheduler_step(freeze_gc=False),
        "block_table_256x128": bench_block_table(),
    }
    for k, v in res.items():
        print(f"{k:22s} {v}")
    print("wrote", write_result("foundation_cpu", res, args.out))


if __name__ == "__main__":
    main()
