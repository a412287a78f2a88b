"""A/B of the Triton decode kernel's split merge on the GPU: merged by the last split (one
launch per layer) vs a separate merge kernel, dummy:llama3-8b bf16 through CUDA graphs.

Two engines in one process (each with an 8 GiB KV pool), captured with each variant; the
decode timing of ``bench_decode_gpu.decode_run`` alternates between them (ABAB...), and the
medians per shape are reported with their ratio.

    python bench/decode_merge_ab_gpu.py [--out DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_decode_gpu import MODEL, decode_run  # noqa: E402
from common import write_result  # noqa: E402

import layerzero_serve.kernels._triton.paged_decode as paged_decode  # noqa: E402
from layerzero_serve.engine import Engine  # noqa: E402

SHAPES = ((1, 128), (1, 2048), (8, 2048))  # (batch, context): all split the KV


def _engine(fused: bool) -> Engine:
    """An engine whose graphs were captured with the given merge (the default of
    ``triton_paged_decode``'s ``fused_merge`` while it captures)."""
    saved = paged_decode.triton_paged_decode.__defaults__
    paged_decode.triton_paged_decode.__defaults__ = (*saved[:-1], fused)
    try:
        return Engine(
            model=MODEL, dtype="bfloat16", max_model_len=4096, max_num_seqs=64,
            max_num_batched_tokens=8192, kv_cache_bytes=8 << 30,
        )  # fmt: skip
    finally:
        paged_decode.triton_paged_decode.__defaults__ = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    engines = {"fused": _engine(True), "separate": _engine(False)}
    res: dict = {"model": MODEL, "kernels": engines["fused"].stats()["kernels"], "shapes": {}}
    for batch, ctx in SHAPES:
        times: dict[str, list[float]] = {name: [] for name in engines}
        for i in range(args.repeats):
            order = list(engines) if i % 2 == 0 else list(engines)[::-1]
            for name in order:
                times[name].append(decode_run(engines[name], batch, ctx, args.tokens)["step_ms"])
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {
            "ms_per_step": times,
            "median_ms": med,
            "fused_over_separate": med["fused"] / med["separate"],
        }
        res["shapes"][f"batch{batch}_ctx{ctx}"] = row
        print(f"batch {batch} ctx {ctx}: fused {med['fused']:.4f} ms, separate "
              f"{med['separate']:.4f} ms, ratio {row['fused_over_separate']:.4f}")  # fmt: skip
    print("wrote", write_result("decode_merge_ab_gpu", res, args.out))


if __name__ == "__main__":
    main()
