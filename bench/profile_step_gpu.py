"""Where a graph-replayed decode step's time goes (diagnostic, device): torch.profiler over
``--steps`` engine steps at each batch size, printing the host ops by self CPU time and the
GPU's busy share of the wall time (kernels + copies), so host gaps show up as idle GPU time.

    python bench/profile_step_gpu.py --batch 1 64 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from layerzero_serve.engine import Engine
from layerzero_serve.sampling import SamplingParams


def profiled_steps(eng: Engine, batch: int, context: int, steps: int, activities):
    """``(profiler, wall seconds)`` of ``steps`` decode steps of ``batch`` greedy requests of
    ``context`` prompt tokens (after the prefill and warm-up steps, run to completion)."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        eng.add_request([(i * 31 + j) % 1000 + 1 for j in range(context)], params)
    for _ in range(4):  # prefill, first decode steps, sampler-graph capture
        eng.step()
    torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    while eng.has_unfinished():
        eng.step()
    return prof, wall


def profile_batch(eng: Engine, batch: int, context: int, steps: int) -> dict:
    cpu_and_gpu = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    prof, wall = profiled_steps(eng, batch, context, steps, cpu_and_gpu)
    events = prof.events()
    gpu_us = sum(
        e.device_time_total
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0
    )
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return {
        "batch": batch,
        "context": context,
        "steps": steps,
        "wall_ms_per_step": wall / steps * 1e3,
        "gpu_busy_ms_per_step": gpu_us / steps / 1e3,
        "gpu_busy_share": gpu_us / 1e6 / wall,
        "host_ops": table,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    eng = Engine(model="dummy:llama3-8b", dtype="bfloat16", max_model_len=4096)
    rows = []
    for b in args.batch:
        r = profile_batch(eng, b, args.context, args.steps)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "host_ops"}))
        print(r["host_ops"])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_step_gpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
