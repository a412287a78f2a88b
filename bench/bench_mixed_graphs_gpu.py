"""Piecewise graphs for prefill and mixed steps, on a steady mixed workload: new prompts
arrive (Poisson) while the running requests decode.

One engine (``dummy:llama3-8b`` bf16 by default), one workload (seeded: arrival times, prompts
of 512-2048 tokens, outputs of 128-512 tokens), run alternately with the mixed-step graphs off
and on (rounds A B B A ...: the same kernels, KV cache and decode graphs; only the prefill /
mixed steps differ). Per round: output tokens per second, time to first token (arrival to the
first token) and time per output token (first to last token over the output's length), p50
and p99 over the requests. Prints a table and writes ``mixed_graphs_gpu.json``.

    python bench/bench_mixed_graphs_gpu.py [--model M] [--requests N] [--rate R] [--rounds K]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import environment, out_dir_or_default, write_result  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402


def workload(n: int, rate: float, seed: int, vocab: int) -> list[tuple[float, list[int], int]]:
    """``n`` requests: (arrival second, prompt ids, output tokens), Poisson at ``rate``/s."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n))
    plens = rng.integers(512, 2049, size=n)
    olens = rng.integers(128, 513, size=n)
    return [(float(a), rng.integers(0, vocab, size=int(p)).tolist(), int(o))
            for a, p, o in zip(arrivals, plens, olens, strict=True)]  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_round(eng: Engine, work, mixed_on: bool, saved) -> dict:
    """Serve ``work`` in real time; returns throughput and latency percentiles."""
    eng.runner.mixed_graphs = saved if mixed_on else None
    arrival, first, last, count = {}, {}, {}, {}
    pending = list(work)
    t0 = time.perf_counter()
    steps = 0
    replays = saved.replays
    while pending or eng.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            at, prompt, out = pending.pop(0)
            sp = SamplingParams(max_tokens=out, ignore_eos=True, temperature=0.0)
            arrival[eng.add_request(prompt, sp)] = at
        if not eng.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        steps += 1
        outs = eng.step()
        now = time.perf_counter() - t0
        for o in outs:
            if o.new_token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                count[o.request_id] = count.get(o.request_id, 0) + len(o.new_token_ids)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    ttft = [first[r] - arrival[r] for r in arrival]
    tpot = [(last[r] - first[r]) / (count[r] - 1) for r in arrival if count[r] > 1]
    return {
        "mixed_graphs": mixed_on,
        "wall_s": wall,
        "steps": steps,
        "mixed_graph_steps": saved.replays - replays,
        "output_tokens": sum(count.values()),
        "tokens_per_s": sum(count.values()) / wall,
        "ttft_ms_p50": 1e3 * pct(ttft, 50),
        "ttft_ms_p99": 1e3 * pct(ttft, 99),
        "tpot_ms_p50": 1e3 * pct(tpot, 50),
        "tpot_ms_p99": 1e3 * pct(tpot, 99),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--rate", type=float, default=12.0, help="arrivals per second")
    ap.add_argument("--rounds", type=int, default=2, help="A B pairs (alternating order)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    eng = Engine(model=args.model, dtype="bfloat16", max_model_len=4096,
                 max_num_seqs=args.max_num_seqs, max_num_batched_tokens=2048)  # fmt: skip
    saved = eng.runner.mixed_graphs
    if saved is None:
        print("the engine captured no mixed-step graphs", file=sys.stderr)
        return 2
    vocab = eng.runner.model.config.vocab_size
    work = workload(args.requests, args.rate, 0, vocab)
    run_round(eng, workload(16, args.rate, 1, vocab), True, saved)  # warm-up
    rounds = []
    for i in range(args.rounds):
        for on in (False, True) if i % 2 == 0 else (True, False):
            r = run_round(eng, work, on, saved)
            rounds.append(r)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()},
                  flush=True)  # fmt: skip
    summary = {}
    for on in (False, True):
        rs = [r for r in rounds if r["mixed_graphs"] is on]
        summary["on" if on else "off"] = {
            k: statistics.median(r[k] for r in rs)
            for k in ("tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")
        }
    off, on = summary["off"], summary["on"]
    print("\n| metric | mixed graphs off | on | on/off |\n|---|---:|---:|---:|")
    for k in off:
        print(f"| {k} | {off[k]:.2f} | {on[k]:.2f} | {on[k] / off[k]:.3f} |")
    res = {"env": environment(), "args": vars(args) | {"out": str(args.out)},
           "buckets": saved.buckets, "capture_s": saved.capture_seconds,
           "graph_memory_mib": saved.graph_memory_bytes / 2**20,
           "rounds": rounds, "summary": summary}  # fmt: skip
    write_result("mixed_graphs_gpu", res, out_dir_or_default(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
