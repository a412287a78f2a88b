"""Host cost of launching the captured decode graphs (diagnostic, device): for each bucket, the
host time of ``graph.replay()`` (the cudaGraphLaunch call), the GPU time of one replay (CUDA
events) and the wall time from launch to completion, medians over ``--reps`` synchronised
replays. When launch + GPU time ~ wall time the launch is not overlapped with the GPU's work.

    python bench/graph_launch_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from layerzero_serve.engine import Engine


def time_replays(graph: torch.cuda.CUDAGraph, reps: int) -> dict:
    host, wall, gpu = [], [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        graph.replay()
        t1 = time.perf_counter()
        end.record()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e6)
        wall.append((t2 - t0) * 1e6)
        gpu.append(start.elapsed_time(end) * 1e3)
    med = statistics.median
    return {"launch_us": med(host), "gpu_us": med(gpu), "wall_us": med(wall)}


def launch_while_busy(big: torch.cuda.CUDAGraph, reps: int) -> dict:
    """Host time of launching a one-kernel graph, and of one eager kernel, right after ``big``
    was launched (GPU busy) and with the GPU idle: does a launch wait for running graphs?"""
    x = torch.zeros(1, device="cuda")
    small = torch.cuda.CUDAGraph()
    x.add_(1)  # warm-up outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(small):
        x.add_(1)
    out: dict[str, list[float]] = {k: [] for k in ("graph_busy", "graph_idle", "kernel_busy")}
    for _ in range(reps):
        for key, busy, fn in (
            ("graph_busy", True, small.replay),
            ("graph_idle", False, small.replay),
            ("kernel_busy", True, lambda: x.add_(1)),
        ):
            torch.cuda.synchronize()
            if busy:
                big.replay()
            t0 = time.perf_counter()
            fn()
            out[key].append((time.perf_counter() - t0) * 1e6)
            torch.cuda.synchronize()
    return {f"{k}_launch_us": statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    eng = Engine(model="dummy:llama3-8b", dtype="bfloat16", max_model_len=4096)
    graphs = eng.runner.graphs
    rows = []
    for b in (1, 8, 64, 256):
        if b not in graphs.graphs:
            continue
        row = {"bucket": b, **time_replays(graphs.graphs[b].graph, args.reps)}
        if b == 1:
            row |= launch_while_busy(graphs.graphs[b].graph, args.reps)
        rows.append(row)
        print(json.dumps(row))
    if args.out is not None:
        (args.out / "graph_launch_gpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
