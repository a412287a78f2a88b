"""GPU decode benchmark (issue: GPU fast path): dummy:llama3-8b, bf16, one GPU.

* batch-1 decode, ms/token over ``--tokens`` tokens at context 128 and 2048, vs the roofline
  (weight bytes read per step / copy bandwidth measured in this run);
* batch 64 at context 2048: step time vs (weights + KV bytes) / bandwidth;
* transformers ``generate`` on the same shape in the same run (the peer);
* capture time of all buckets and graph memory; host time per step at batch 1 and 256.

    python bench/bench_decode_gpu.py [--out DIR] [--skip-hf]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import write_result  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402

MODEL = "dummy:llama3-8b"


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of reps)."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(reps + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times[3:])


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decode step: every parameter but the input embedding (a gather)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.model.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == emb.data_ptr()
    return total - (0 if tied else emb.numel() * emb.element_size())


def decode_run(eng: Engine, batch: int, context: int, tokens: int) -> dict:
    """Prefill ``batch`` prompts of ``context`` tokens, then time ``tokens`` decode steps.

    ``step_ms``: wall time of the timed steps over their number, synchronised at the end only
    (with async scheduling a step's host work overlaps the next step's GPU work, which a sync
    after every step would undo). Three untimed decode steps first (sampler-graph capture)."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens + 4, ignore_eos=True)
    g = torch.Generator().manual_seed(batch * 7 + context)
    for _ in range(batch):
        eng.add_request(torch.randint(0, 128000, (context,), generator=g).tolist(), params)
    while (
        any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running)
        or eng.scheduler.waiting
    ):
        eng.step()  # prefill (and the first token)
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    tm = eng.runner.timings
    host0 = tm.schedule + tm.update
    steps = 0
    t0 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        steps += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    host = tm.schedule + tm.update - host0
    return {
        "step_ms": elapsed / max(steps, 1) * 1e3,
        "steps": steps,
        "schedule_update_us_per_step": host / max(steps, 1) * 1e6,
    }


def set_async(eng: Engine, on: bool) -> None:
    """Async scheduling on or off in a built engine (its execution strategy)."""
    from layerzero_serve._step_execution import SyncExecution

    if not hasattr(eng, "_launch_ahead"):
        eng._launch_ahead = eng._async  # the strategy built at start-up (None: graphs off)
    ahead = eng._launch_ahead if on else None
    if hasattr(eng, "_set_execution"):
        eng._set_execution(ahead or SyncExecution(eng.runner, eng.scheduler))
    else:  # engines before the step-loop redesign
        eng._async = ahead


def host_time_per_step(eng: Engine, batch: int, steps: int = 50) -> dict:
    """Host work per step (schedule + prepare + sample + update) with the GPU synchronised
    around the forward, so device time is excluded (async scheduling off: its phases overlap
    the device's)."""
    set_async(eng, False)
    eng.runner.timings.sync = True
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    for i in range(batch):
        eng.add_request([(i * 13 + j) % 1000 for j in range(16)], params)
    for _ in range(3):
        eng.step()
    tm = eng.runner.timings
    before = tm.as_dict()
    n0 = tm.steps
    while eng.has_unfinished():
        eng.step()
    after = tm.as_dict()
    eng.runner.timings.sync = False
    set_async(eng, True)
    n = tm.steps - n0
    d = {k: (after[k] - before[k]) / n * 1e6 for k in after}
    return {
        "batch": batch,
        "us_per_step": d,
        "host_us_per_step": d["schedule"] + d["prepare"] + d["sample"] + d["update"],
    }


def hf_peer(tokens: int, context: int) -> dict:
    import transformers

    from layerzero_serve._models.dummy import DUMMY_PRESETS

    cfg = transformers.LlamaConfig(
        **{
            k: v
            for k, v in DUMMY_PRESETS[MODEL].items()
            if k not in ("architectures", "torch_dtype")
        }
    )
    with torch.device("cuda"):
        hf = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128000, (1, context), device="cuda")
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(
            ids,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / tokens * 1e3
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "ms_per_token": ms,
        "context": context,
        "tokens": tokens,
        "transformers": transformers.__version__,
    }


def async_ab(eng: Engine, res: dict, tokens: int) -> None:
    """A/B in this run: async scheduling on vs off, alternating so that drift does not favour
    either; ``res["async_ab_batch*"]`` (ms per step)."""
    modes = ("async", "sync", "sync", "async")
    for batch, ctx, steps in ((1, 128, tokens), (64, 2048, 48)):
        key = f"async_ab_batch{batch}_ctx{ctx}"
        for mode in modes:
            set_async(eng, mode == "async")
            ms = decode_run(eng, batch, ctx, steps)["step_ms"]
            res.setdefault(key, {}).setdefault(mode, []).append(ms)
        print(f"batch {batch} ctx {ctx} async A/B ms/step:", res[key])
    set_async(eng, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    args = ap.parse_args()
    bw = copy_bandwidth()
    # The peer first, on an empty GPU; then ours.
    peer = None if args.skip_hf else hf_peer(64, 128)
    if peer:
        print("transformers:", peer)
    t0 = time.perf_counter()
    eng = Engine(
        model=MODEL,
        dtype="bfloat16",
        max_model_len=4096,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=8192,
    )
    startup = time.perf_counter() - t0
    wbytes = weight_bytes(eng.runner.model)
    spec = eng.runner.kv_cache.spec
    kv_bytes_per_token = spec.bytes_per_block // spec.block_size
    res: dict = {
        "model": MODEL,
        "copy_bandwidth_GBps": bw / 1e9,
        "weight_bytes": wbytes,
        "startup_s": startup,
        "kernels": eng.stats()["kernels"],
        "graph_capture_s": eng.runner.graphs.capture_seconds if eng.runner.graphs else None,
        "graph_memory_MiB": (
            eng.runner.graphs.graph_memory_bytes / 2**20 if eng.runner.graphs else None
        ),
        "graph_buckets": eng.runner.graphs.buckets if eng.runner.graphs else None,
    }
    for ctx in (128, 2048):
        r = decode_run(eng, 1, ctx, args.tokens)
        floor_ms = (wbytes + ctx * kv_bytes_per_token) / bw * 1e3
        r |= {
            "context": ctx,
            "roofline_ms": floor_ms,
            "fraction_of_roofline": floor_ms / r["step_ms"],
        }
        res[f"batch1_ctx{ctx}"] = r
        write_result("decode_gpu", res, args.out)
        print(
            f"batch 1 ctx {ctx}: {r['step_ms']:.3f} ms/token, roofline "
            f"{floor_ms:.3f} ms -> {r['fraction_of_roofline']:.1%}"
        )
    async_ab(eng, res, args.tokens)
    r = decode_run(eng, 64, 2048, 64)
    floor_ms = (wbytes + 64 * 2048 * kv_bytes_per_token) / bw * 1e3
    r |= {"roofline_ms": floor_ms, "ratio_to_floor": r["step_ms"] / floor_ms}
    res["batch64_ctx2048"] = r
    print(
        f"batch 64 ctx 2048: {r['step_ms']:.3f} ms/step, floor {floor_ms:.3f} ms -> "
        f"{r['ratio_to_floor']:.2f}x"
    )
    res["host_batch1"] = host_time_per_step(eng, 1)
    res["host_batch256"] = host_time_per_step(eng, min(256, args.max_num_seqs))
    print(
        "host us/step:",
        res["host_batch1"]["host_us_per_step"],
        res["host_batch256"]["host_us_per_step"],
    )
    if peer:
        res["transformers_generate_batch1_ctx128"] = peer
        res["speedup_vs_transformers_ctx128"] = (
            peer["ms_per_token"] / res["batch1_ctx128"]["step_ms"]
        )
    print("wrote", write_result("decode_gpu", res, args.out))


if __name__ == "__main__":
    main()
