"""Sampling kernels at batch 1, 64 and 256 x vocabulary 128256 (top-k 50 + top-p 0.9): every
``Op.SAMPLING`` kernel the selection catalog can build here (torch, Triton, FlashInfer), a plain
torch sort + multinomial implementation written below as the baseline, and the whole sampler
step (``prepare`` on the host, ``sample`` on the device). Medians of repeats (CUDA events on a
GPU, ``perf_counter`` on the CPU) and ratios to the baseline measured in the same run.

    python bench/bench_sampling.py                      # GPU: writes sampling_<device>.json
    python bench/bench_sampling.py --device cpu --vocab 32000 --batches 1 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import environment, out_dir_or_default  # noqa: E402

from layerzero_serve.kernels._catalog import all_specs  # noqa: E402
from layerzero_serve.kernels.spec import KernelContext, Op  # noqa: E402
from layerzero_serve.sampling import Sampler, SamplingParams  # noqa: E402
from layerzero_serve.sampling._rows import CallRow  # noqa: E402


def plain_torch_sample(probs, top_k, top_p, min_p, seed, offset) -> torch.Tensor:
    """The baseline: sort, mask top-k and top-p, ``torch.multinomial`` (generator state)."""
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    sorted_p = sorted_p.masked_fill(ranks >= top_k.unsqueeze(-1), 0.0)
    cum = sorted_p.cumsum(dim=-1)
    sorted_p = sorted_p.masked_fill(cum - sorted_p >= top_p.unsqueeze(-1) * cum[:, -1:], 0.0)
    choice = torch.multinomial(sorted_p, 1)
    return idx.gather(1, choice).squeeze(-1)


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernels(device: str, vocab: int) -> dict[str, object]:
    """Sampling kernels built through the catalog specs' factories (skipping those whose
    library is missing or that cannot run on this device)."""
    out: dict[str, object] = {}
    ctx = KernelContext(Op.SAMPLING, device_type=device, vocab_size=vocab)
    for spec in all_specs():
        if spec.op != Op.SAMPLING or device not in spec.device_types:
            continue
        try:
            out[spec.name] = spec.factory(ctx)
        except Exception as e:  # the library is not installed
            print(f"  {spec.name}: unavailable ({type(e).__name__}: {e})"[:160])
    return out


def capture_step(sampler: Sampler, logits: torch.Tensor, batch) -> torch.cuda.CUDAGraph:
    """``sampler.sample(logits, batch)`` captured in a CUDA graph (after a warm-up run)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sampler.sample(logits, batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sampler.sample(logits, batch)
    return graph


def bench_batch(batch: int, vocab: int, device: str, repeats: int, warmup: int) -> dict:
    g = torch.Generator(device=device).manual_seed(batch)
    logits = torch.randn(batch, vocab, device=device, generator=g) * 3
    probs = torch.softmax(logits, dim=-1)
    args = (
        probs,
        torch.full((batch,), 50, dtype=torch.int32, device=device),
        torch.full((batch,), 0.9, device=device),
        torch.zeros(batch, device=device),
        torch.arange(batch, dtype=torch.int64, device=device),
        torch.zeros(batch, dtype=torch.int64, device=device),
    )
    row: dict[str, object] = {"batch": batch, "vocab": vocab}
    base = median_ms(lambda: plain_torch_sample(*args), device, repeats, warmup)
    row["plain_torch_ms"] = base
    # the same from logits (softmax included): the reference for kernels that take logits
    # and for the sampler's whole step, which starts from logits
    base_l = median_ms(
        lambda: plain_torch_sample(torch.softmax(logits, dim=-1), *args[1:]),
        device,
        repeats,
        warmup,
    )
    row["plain_torch_from_logits_ms"] = base_l
    for name, kernel in kernels(device, vocab).items():
        try:
            ms = median_ms(lambda k=kernel: k.sample(*args), device, repeats, warmup)
        except Exception as e:  # e.g. Triton on a CPU without TRITON_INTERPRET
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:200]
            continue
        row[f"{name}_ms"] = ms
        row[f"{name}_speedup_vs_plain"] = base / ms
        if getattr(kernel, "takes_logits", False):
            ones = torch.ones(batch, device=device)
            ms_l = median_ms(
                lambda k=kernel, t=ones: k.sample_logits(logits, t, *args[1:]),
                device,
                repeats,
                warmup,
            )
            row[f"{name}_from_logits_ms"] = ms_l
            row[f"{name}_from_logits_speedup_vs_plain"] = base_l / ms_l
        # the whole step through the sampler with this kernel: prepare (host) + sample
        sampler = Sampler(seed=0, max_num_seqs=batch, kernel=kernel).bind(device, vocab)
        params = SamplingParams(top_k=50, top_p=0.9)
        rows = [CallRow(i, params, [1], [1]) for i in range(batch)]
        sampler.prepare(rows)
        row[f"{name}_prepare_us"] = 1e3 * median_ms(
            lambda s=sampler, r=rows: s.prepare(r), "cpu", repeats, warmup
        )
        prepared = sampler.prepare(rows)
        row[f"{name}_sampler_step_ms"] = median_ms(
            lambda s=sampler, b=prepared: s.sample(logits, b), device, repeats, warmup
        )
        row[f"{name}_sampler_step_speedup_vs_plain"] = base_l / row[f"{name}_sampler_step_ms"]
        if device == "cuda":  # the step as the engine runs it: replayed from a CUDA graph
            graph = capture_step(sampler, logits, prepared)
            ms_g = median_ms(graph.replay, device, repeats, warmup)
            row[f"{name}_sampler_graph_ms"] = ms_g
            row[f"{name}_sampler_graph_speedup_vs_plain"] = base_l / ms_g
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--repeats", type=int, default=None, help="default 50 (GPU) / 5 (CPU)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    gpu = a.device.startswith("cuda")
    repeats = a.repeats or (50 if gpu else 5)
    warmup = 5 if gpu else 1
    env = environment()
    name = env["device"].replace(" ", "_").lower() if gpu else "cpu"
    out = a.out or out_dir_or_default(None) / f"sampling_{name}.json"
    device = "cuda" if gpu else "cpu"
    results = []
    for b in a.batches:
        print(f"batch {b} x vocab {a.vocab} ...", flush=True)
        results.append(bench_batch(b, a.vocab, device, repeats, warmup))
        print("  " + json.dumps(results[-1]))
    doc = {
        "benchmark": "sampling",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": env,
        "setting": "top-k 50 + top-p 0.9; probs float32; seed/offset int64 tensors",
        "timing": f"median of {repeats} after {warmup} warm-up runs; "
        + ("CUDA events" if gpu else "perf_counter"),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
