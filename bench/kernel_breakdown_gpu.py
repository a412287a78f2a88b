"""Where a decode step's GPU time goes, kernel by kernel (diagnostic, device).

Profiles ``--steps`` engine steps of ``dummy:llama3-8b`` at one batch size, in graph mode
(or, with ``--eager``, eagerly), and prints per kernel name: launches per step, GPU µs per step and
µs per launch. Also the sum of all kernel time per step against the step's wall time, which
separates kernel time from the gaps between kernels (launch latency inside the graph).

    python bench/kernel_breakdown_gpu.py --batch 1 --out DIR [--eager]

(One engine per process: the 8B model twice does not fit next to a full KV pool.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step_gpu import profiled_steps  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402


def breakdown(eng: Engine, batch: int, context: int, steps: int) -> dict:
    prof, wall = profiled_steps(eng, batch, context, steps, [ProfilerActivity.CUDA])
    per_name: dict[str, list[float]] = defaultdict(list)
    starts, ends = [], []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            per_name[e.name].append(e.device_time_total)
            starts.append(e.time_range.start)
            ends.append(e.time_range.end)
    rows = sorted(
        (
            {
                "kernel": name[:110],
                "per_step": len(ts) / steps,
                "us_per_step": sum(ts) / steps,
                "us_each": sum(ts) / len(ts),
            }
            for name, ts in per_name.items()
        ),
        key=lambda r: -r["us_per_step"],
    )
    kernel_us = sum(r["us_per_step"] for r in rows)
    return {
        "batch": batch,
        "context": context,
        "wall_ms_per_step": wall / steps * 1e3,
        "kernel_ms_per_step": kernel_us / 1e3,
        "launches_per_step": sum(r["per_step"] for r in rows),
        "span_ms_per_step": (max(ends) - min(starts)) / steps / 1e3 if starts else 0.0,
        "kernels": rows[:40],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eager", action="store_true", help="profile enforce_eager instead")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    for mode in ("eager",) if args.eager else ("graphs",):  # one engine per process
        eng = Engine(
            model="dummy:llama3-8b",
            dtype="bfloat16",
            max_model_len=4096,
            max_num_seqs=max(8, args.batch),
            enforce_eager=mode == "eager",
        )
        r = breakdown(eng, args.batch, args.context, args.steps)
        results[mode] = r
        print(mode, json.dumps({k: v for k, v in r.items() if k != "kernels"}))
        for k in r["kernels"]:
            print(
                f"  {k['per_step']:6.1f}x {k['us_per_step']:9.1f} us/step "
                f"{k['us_each']:8.2f} us each  {k['kernel']}"
            )
        del eng
        torch.cuda.empty_cache()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = "eager" if args.eager else "graphs"
        (args.out / f"kernel_breakdown_b{args.batch}_{tag}.json").write_text(
            json.dumps(results, indent=1)
        )


if __name__ == "__main__":
    main()
