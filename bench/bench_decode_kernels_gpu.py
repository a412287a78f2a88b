"""Paged decode attention kernels on the GPU, one layer, Llama-3-8B attention shape (32 q / 8 kv
heads, head_dim 128, page 16, bf16): time per call (median of CUDA-event repeats) and achieved
KV bandwidth vs the device copy bandwidth measured in the same run, plus a determinism check
that matters for CUDA graphs: a graph captured under one plan (the longest lengths) and replayed
after re-planning for this step's lengths must equal an eager call of the same kernel.

Variants: FlashInfer CUDA-core decode (default), FlashInfer with ``disable_split_kv``,
FlashInfer tensor-core decode, and the project's Triton split-KV decode.

    python bench/bench_decode_kernels_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, out_dir_or_default  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16


def _events_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _events_ms(lambda: y.copy_(x), 20)
    return 2 * x.numel() / (ms / 1e3)


def _lists(lens: np.ndarray, table: np.ndarray):
    pages = np.maximum(-(-lens // BS), 1)
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    mask = np.arange(table.shape[1])[None, :] < pages[:, None]
    indices = table[mask].astype(np.int32)
    last = np.maximum(lens - (pages - 1) * BS, 1).astype(np.int32)
    return torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(last)


def _plan(w, lens, table, **kw):
    indptr, indices, last = _lists(lens, table)
    w.plan(indptr, indices, last, HQ, HKV, D, BS, q_data_type=DTYPE, kv_data_type=DTYPE, **kw)


def run_case(batch: int, ctx: int, cap_len: int, ws: torch.Tensor) -> dict:
    import flashinfer

    from layerzero_serve.kernels._triton.paged_decode import triton_paged_decode

    width = -(-cap_len // BS)
    blocks = batch * width + 1
    cache = torch.randn(blocks, 2, BS, HKV, D, dtype=DTYPE, device="cuda")
    table = (np.arange(batch * width, dtype=np.int32) + 1).reshape(batch, width)
    lens = np.full(batch, ctx, dtype=np.int64)
    if batch > 1:  # one short row and one padding-like row: uneven splits
        lens[0] = max(1, ctx // 3)
        lens[-1] = 1
    q = torch.randn(batch, HQ, D, dtype=DTYPE, device="cuda")
    kv_bytes = int(lens.sum()) * 2 * HKV * D * 2
    out: dict = {"batch": batch, "context": ctx, "kv_bytes": kv_bytes}

    variants = {
        "flashinfer_cuda_core": ({}, {}),
        "flashinfer_no_split": ({}, {"disable_split_kv": True}),
        "flashinfer_tensor_core": ({"use_tensor_cores": True}, {}),
    }
    for name, (ctor, plan_kw) in variants.items():
        rec: dict = {}
        try:
            eager = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", **ctor)
            _plan(eager, lens, table, **plan_kw)
            ref = eager.run(q, cache)
            rec["ms"] = _events_ms(lambda e=eager: e.run(q, cache))
            # graph mode: fixed buffers, capture under the longest plan, replay re-planned
            bufs = (
                torch.zeros(batch + 1, dtype=torch.int32, device="cuda"),
                torch.zeros(batch * width, dtype=torch.int32, device="cuda"),
                torch.zeros(batch, dtype=torch.int32, device="cuda"),
            )
            gw = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                ws,
                "NHD",
                use_cuda_graph=True,
                paged_kv_indptr_buffer=bufs[0],
                paged_kv_indices_buffer=bufs[1],
                paged_kv_last_page_len_buffer=bufs[2],
                **ctor,
            )
            _plan(gw, np.full(batch, cap_len, dtype=np.int64), table, **plan_kw)
            gw.run(q, cache)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                g_out = gw.run(q, cache)
            _plan(gw, lens, table, **plan_kw)
            g.replay()
            replay = g_out.clone()
            same_wrapper_eager = gw.run(q, cache)
            rec["replay_equals_eager_same_wrapper"] = bool(torch.equal(replay, same_wrapper_eager))
            rec["replay_equals_plain_eager"] = bool(torch.equal(replay, ref))
            rec["max_abs_replay_vs_eager"] = float((replay - ref).abs().max())
            rec["graph_ms"] = _events_ms(g.replay)
        except Exception as e:  # report, keep measuring the others
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        out[name] = rec

    seq = torch.from_numpy(lens.astype(np.int32)).cuda()
    tab = torch.from_numpy(table).cuda()
    rec = {}
    ref = triton_paged_decode(q, cache, tab, seq)
    rec["ms"] = _events_ms(lambda: triton_paged_decode(q, cache, tab, seq))
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        g_out = triton_paged_decode(q, cache, tab, seq)
    g.replay()
    rec["replay_equals_plain_eager"] = bool(torch.equal(g_out, ref))
    rec["graph_ms"] = _events_ms(g.replay)
    out["triton_split_kv"] = rec
    for name in ("flashinfer_cuda_core", "flashinfer_no_split", "flashinfer_tensor_core"):
        if "ms" in out[name]:
            out[name]["kv_gbps"] = kv_bytes / out[name]["ms"] / 1e6
    rec["kv_gbps"] = kv_bytes / rec["ms"] / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results folder (default: bench/out/)")
    args = ap.parse_args()
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    bw = copy_bandwidth()
    cases = []
    for batch, ctx in [(1, 128), (1, 2048), (2, 600), (8, 2048), (64, 2048), (256, 2048)]:
        r = run_case(batch, ctx, 4096, ws)
        for v in r.values():
            if isinstance(v, dict) and "kv_gbps" in v:
                v["fraction_of_copy_bw"] = v["kv_gbps"] * 1e9 / bw
        cases.append(r)
        print(json.dumps(r), flush=True)
    doc = {"environment": environment(), "copy_bandwidth_gbps": bw / 1e9, "cases": cases}
    path = out_dir_or_default(args.out) / "decode_kernels_gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
