"""What sampling costs over greedy, per configuration and kernel: the sampler's whole step
(processors, softmax where the kernel needs it, the draw, logprob packing) captured in a CUDA
graph and replayed, at batch 1 and 64 x vocabulary 128256, as the engine runs it.

For each kernel (the catalog's ``Op.SAMPLING`` kernels that build here, plus
``triton.topk_sampling`` with its split path off, the earlier one-program-per-row fallback)
and each configuration (temperature alone, top-k 50 / 200 / 1000, top-p, min-p, their
combinations, seeded rows, penalties), the median replay time and its difference to the greedy
step's median measured in the same run. Logits are ``N(0, 3^2)`` (flat like a random-weight
model's, the hard case for top-p: its cut falls in the bulk of the vocabulary).

    python bench/bench_sampling_cost_gpu.py --out DIR        # GPU only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_sampling import capture_step, kernels, median_ms  # noqa: E402
from common import environment, out_dir_or_default, write_result  # noqa: E402

from layerzero_serve.kernels._triton.topk_sampling import (  # noqa: E402
    TritonTopKSamplingKernel,
)
from layerzero_serve.sampling import Sampler, SamplingParams  # noqa: E402
from layerzero_serve.sampling._rows import CallRow  # noqa: E402

CONFIGS: dict[str, dict] = {
    "t0.8": dict(temperature=0.8),
    "t0.8_k50": dict(temperature=0.8, top_k=50),
    "t0.8_k200": dict(temperature=0.8, top_k=200),
    "t0.8_k1000": dict(temperature=0.8, top_k=1000),
    "t0.8_p0.9": dict(temperature=0.8, top_p=0.9),
    "t0.8_k200_p0.95": dict(temperature=0.8, top_k=200, top_p=0.95),
    "t0.8_k1000_p0.9": dict(temperature=0.8, top_k=1000, top_p=0.9),
    "t0.8_minp0.1": dict(temperature=0.8, min_p=0.1),
    "t0.8_k200_seed": dict(temperature=0.8, top_k=200, seed=1),
    "t0.8_p0.9_seed": dict(temperature=0.8, top_p=0.9, seed=1),
    "t0.8_k200_penalties": dict(
        temperature=0.8, top_k=200, repetition_penalty=1.1, presence_penalty=0.5
    ),  # fmt: skip
}


class StreamingFallback(TritonTopKSamplingKernel):
    """``triton.topk_sampling`` with the earlier fallback (one program streams each row)."""

    name = "triton.topk_sampling[stream]"
    split = False


def graph_ms(sampler: Sampler, logits, params: SamplingParams, batch: int, reps: int) -> float:
    """Median replay time (ms) of the sampler step for ``batch`` rows of ``params``."""
    rows = [CallRow(i, params, [1, 2, 3], [1, 2, 3, 4, 5]) for i in range(batch)]
    prepared = sampler.prepare(rows)
    graph = capture_step(sampler, logits, prepared)
    ms = median_ms(graph.replay, "cuda", reps, warmup=5)
    for r in rows:
        sampler.release(r.request_id)
    return ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--kernels", nargs="*", default=None, help="names to keep (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    found = kernels("cuda", args.vocab)
    found[StreamingFallback.name] = StreamingFallback()
    if args.kernels:
        found = {n: k for n, k in found.items() if n in args.kernels}
    res: dict = {"env": environment(), "vocab": args.vocab, "repeats": args.repeats, "rows": []}
    for batch in args.batches:
        g = torch.Generator(device="cuda").manual_seed(batch)
        logits = torch.randn(batch, args.vocab, device="cuda", generator=g) * 3
        for name, kernel in found.items():
            sampler = Sampler(seed=0, max_num_seqs=batch, kernel=kernel).bind("cuda", args.vocab)
            greedy = graph_ms(sampler, logits, SamplingParams(temperature=0.0), batch, args.repeats)
            row = {"batch": batch, "kernel": name, "greedy_ms": greedy, "extra_ms": {}}
            for cfg, kw in CONFIGS.items():
                try:
                    ms = graph_ms(sampler, logits, SamplingParams(**kw), batch, args.repeats)
                except Exception as e:  # a kernel that cannot run this configuration
                    row["extra_ms"][cfg] = f"{type(e).__name__}: {e}"[:160]
                    continue
                row["extra_ms"][cfg] = round(ms - greedy, 4)
            res["rows"].append(row)
            worst = max((v for v in row["extra_ms"].values() if isinstance(v, float)), default=0)
            print(f"b{batch} {name}: greedy {greedy:.4f} ms, worst extra {worst:.4f} ms, "
                  f"{row['extra_ms']}", flush=True)  # fmt: skip
    out = out_dir_or_default(args.out)
    write_result("sampling_cost_gpu", res, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
