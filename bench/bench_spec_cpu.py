"""Host-side costs of speculative decoding (CPU): n-gram proposal per request and step for
4k-token contexts (stateless scan from a list and from an int array; incremental index in steady
state, plus its one-off build), the torch reference verifier, metrics and adaptive-k updates.

    python bench/bench_spec_cpu.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import median_time, write_result  # noqa: E402

from layerzero_serve.spec_decode import (  # noqa: E402
    AdaptiveK,
    NgramIndex,
    NgramProposer,
    SpecDecodeMetrics,
    draw_randoms,
    rejection_sample,
)

CONTEXT = 4096


def make_context(length: int, seed: int, vocab: int = 32_000) -> list[int]:
    """Random tokens where about a third of the text repeats earlier spans (code, quotes)."""
    rng = random.Random(seed)
    toks: list[int] = []
    while len(toks) < length:
        if len(toks) > 64 and rng.random() < 0.3:
            start = rng.randrange(len(toks) - 32)
            toks.extend(toks[start : start + rng.randint(4, 32)])
        else:
            toks.extend(rng.randrange(vocab) for _ in range(rng.randint(4, 32)))
    return toks[:length]


def bench_ngram_scan(num_requests: int = 16) -> dict:
    prop = NgramProposer(k=4, min_n=2, max_n=4)
    lists = [make_context(CONTEXT, i) for i in range(num_requests)]
    arrays = [np.asarray(t, dtype=np.int64) for t in lists]
    t_list = median_time(lambda: prop.propose(lists), repeats=15)
    t_array = median_time(lambda: prop.propose(arrays), repeats=15)
    hits = sum(bool(d) for d in prop.propose(lists))
    return {
        "per_request_us_from_list": t_list / num_requests * 1e6,
        "per_request_us_from_array": t_array / num_requests * 1e6,
        "context_len": CONTEXT,
        "requests_with_drafts": f"{hits}/{num_requests}",
    }


def bench_ngram_incremental(num_requests: int = 64, steps: int = 200) -> dict:
    """Steady state: each step appends 1-3 tokens per request (accepted drafts + one) and
    proposes; contexts start at 4k tokens."""
    prop = NgramProposer(k=4, min_n=2, max_n=4)
    rng = random.Random(1)
    contexts = [make_context(CONTEXT, i) for i in range(num_requests)]
    ids = [f"r{i}" for i in range(num_requests)]
    t0 = time.perf_counter()
    prop.propose(contexts, request_ids=ids)  # builds every index once
    build = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        for toks in contexts:
            toks.extend(toks[-rng.randint(40, 400)] for _ in range(rng.randint(1, 3)))
        t0 = time.perf_counter()
        prop.propose(contexts, request_ids=ids)
        times.append(time.perf_counter() - t0)
    per_step = float(np.median(times))
    index = NgramIndex(2, 4)
    t_extend = median_time(lambda: NgramIndex(2, 4).extend(contexts[0]), repeats=5)
    index.extend(contexts[0])
    t_propose = median_time(lambda: index.propose(4), repeats=7, warmup=1)
    return {
        "per_request_step_us": per_step / num_requests * 1e6,
        "batch_step_us": per_step * 1e6,
        "num_requests": num_requests,
        "build_per_token_us": build / (num_requests * CONTEXT) * 1e6,
        "extend_per_token_us": t_extend / len(contexts[0]) * 1e6,
        "propose_only_us": t_propose * 1e6,
    }


def bench_rejection(b: int = 64, k: int = 4, v: int = 32_000) -> dict:
    gen = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(b, k + 1, v, generator=gen) * 3, -1)
    draft = torch.softmax(torch.randn(b, k, v, generator=gen) * 3, -1)
    ids = torch.multinomial(draft.reshape(-1, v), 1, generator=gen).reshape(b, k)
    nd = torch.full((b,), k, dtype=torch.int32)
    u, noise = draw_randoms(b, k, v, generator=gen)
    t_q = median_time(lambda: rejection_sample(ids, draft, target, u, noise, nd))
    t_1h = median_time(lambda: rejection_sample(ids, None, target, u, noise, nd))
    t_rand = median_time(lambda: draw_randoms(b, k, v, generator=gen))
    return {
        "shape": f"B={b} k={k} V={v}",
        "torch_threads": torch.get_num_threads(),
        "with_draft_probs_ms": t_q * 1e3,
        "one_hot_q_ms": t_1h * 1e3,
        "draw_randoms_ms": t_rand * 1e3,
    }


def bench_bookkeeping(b: int = 256, k: int = 4) -> dict:
    rng = np.random.default_rng(0)
    drafts = rng.integers(0, k + 1, size=b)
    accepted = rng.integers(0, drafts + 1)
    ids = [f"r{i}" for i in range(b)]
    metrics = SpecDecodeMetrics(k)
    ak = AdaptiveK(k)
    return {
        "batch": b,
        "metrics_update_us": median_time(lambda: metrics.update(drafts, accepted)) * 1e6,
        "metrics_update_per_request_us": median_time(
            lambda: metrics.update(drafts, accepted, request_ids=ids)
        )
        * 1e6,
        "adaptive_update_us": median_time(lambda: ak.update(drafts, accepted)) * 1e6,
        "adaptive_choose_us": median_time(lambda: ak.choose(b)) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args()
    res = {
        "ngram_scan_4k": bench_ngram_scan(),
        "ngram_incremental_4k": bench_ngram_incremental(),
        "rejection_torch_cpu": bench_rejection(),
        "bookkeeping": bench_bookkeeping(),
    }
    for name, v in res.items():
        print(f"{name:22s} {v}")
    print("wrote", write_result("spec_cpu", res, args.out))


if __name__ == "__main__":
    main()
