"""Tensor-parallel decode benchmark: ``dummy:llama3-8b`` bf16, TP=1 vs TP=N (default 2) in the
same run on one host. Batch 1 at context 128 and 2048, batch 64 at context 2048: median ms per
decode step over repeats, the fraction of the N-GPU weight-read roofline (weight bytes per rank
/ copy bandwidth measured here), and the all-reduce time per step (the 2 x layers + 1
all-reduces of a decode step's hidden size, timed alone on N ranks through ``torch.distributed``
in a separate measurement, so the figure is what the collectives cost, not a guess).

    python bench/bench_tp_gpu.py [--tp 2] [--out DIR]

Needs N GPUs; with fewer it writes nothing and says so (exit code 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode_gpu import copy_bandwidth  # noqa: E402
from common import write_result  # noqa: E402

MODEL = "dummy:llama3-8b"
CASES = [(1, 128, 128), (1, 2048, 128), (64, 2048, 48)]  # (batch, context, decode tokens)

_ENGINE_RUN = """
import json, sys, time, statistics, torch
from layerzero_serve import Engine, SamplingParams
tp, cases = int(sys.argv[1]), json.loads(sys.argv[2])
eng = Engine(model="dummy:llama3-8b", dtype="bfloat16", tensor_parallel_size=tp,
             max_model_len=4096, max_num_seqs=64, max_num_batched_tokens=8192)
m = eng.runner.model
wb = sum(p.numel() * p.element_size() for p in m.parameters())
wb -= m.model.embed_tokens.weight.numel() * m.model.embed_tokens.weight.element_size()
res = {"tp": tp, "weight_bytes_per_rank": wb}
def once(batch, ctx, tokens):
    g = torch.Generator().manual_seed(batch + ctx)
    for _ in range(batch):
        eng.add_request(torch.randint(0, 128000, (ctx,), generator=g).tolist(),
                        SamplingParams(max_tokens=tokens + 8, ignore_eos=True, temperature=0.0))
    for _ in range(12):
        eng.step()
    torch.cuda.synchronize(); t = time.perf_counter(); n = 0
    while eng.has_unfinished():
        eng.step(); n += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3
for batch, ctx, tokens in cases:
    ms = [once(batch, ctx, tokens) for _ in range(3)]
    res[f"b{batch}_ctx{ctx}_ms"] = ms
eng.close()
print("RESULT " + json.dumps(res))
"""

_ALLREDUCE = """
import os, sys, time, statistics, torch, torch.distributed as dist
rank, n, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                        device_id=torch.device("cuda", rank))
out = {}
for batch in (1, 64):
    x = torch.randn(batch, 4096, dtype=torch.bfloat16, device="cuda")
    for _ in range(20):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(65):  # one decode step of a 32-layer model: 2 per layer + embedding
            dist.all_reduce(x)
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    out[f"allreduce_per_step_b{batch}_ms"] = statistics.median(ts)
if rank == 0:
    print("RESULT " + __import__("json").dumps(out))
dist.destroy_process_group()
"""


def _result(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd="/tmp")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(lines[-1][7:])


def allreduce_time(n: int) -> dict:
    from layerzero_serve.distributed import free_port

    port = str(free_port())
    script = textwrap.dedent(_ALLREDUCE)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), str(n), port],
                              stdout=subprocess.PIPE, text=True, cwd="/tmp")
             for r in range(n)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    line = [x for x in outs[0].splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    have = torch.cuda.device_count()
    if have < args.tp:
        print(f"bench_tp_gpu: needs {args.tp} GPUs, this host has {have}: nothing measured")
        return
    bw = copy_bandwidth()
    script = textwrap.dedent(_ENGINE_RUN)
    runs = {}
    for tp in (1, args.tp):
        t0 = time.perf_counter()
        runs[tp] = _result([sys.executable, "-c", script, str(tp), json.dumps(CASES)])
        print(f"TP={tp}: {time.perf_counter() - t0:.0f} s", flush=True)
    res = {"device": torch.cuda.get_device_name(0), "gpus": args.tp, "copy_bandwidth": bw,
           "torch": torch.__version__, **allreduce_time(args.tp)}  # fmt: skip
    for batch, ctx, _ in CASES:
        key = f"b{batch}_ctx{ctx}_ms"
        one, many = (statistics.median(runs[t][key]) for t in (1, args.tp))
        floor = runs[args.tp]["weight_bytes_per_rank"] / bw * 1e3
        res[key] = {"tp1": runs[1][key], f"tp{args.tp}": runs[args.tp][key],
                    "speedup": one / many, "roofline_fraction": floor / many}  # fmt: skip
        print(
            f"b{batch} ctx{ctx}: TP1 {one:.2f} ms, TP{args.tp} {many:.2f} ms "
            f"({one / many:.2f}x), {100 * floor / many:.0f}% of the {args.tp}-GPU roofline"
        )
    write_result(f"tp{args.tp}_gpu", res, Path(args.out))


if __name__ == "__main__":
    main()
