"""A/B of two installed versions of the package on the GPU, alternating in one run (ABBA...),
for a change that must not slow decoding down (the redesign).

    python bench/commit_ab_gpu.py --site before=/root/ab/before --site after=/root/ab/after \
        [--rounds 3] [--out DIR]

Each ``--site`` is a folder with the package installed into it (``pip install --target``).
Every run is a fresh process with that folder first on ``PYTHONPATH``; it builds
``dummy:llama3-8b`` in bf16 (CUDA graphs, async scheduling: the defaults) and times decode at
batch 1 (context 128 and 2048) and batch 64 (context 2048) with ``bench_decode_gpu.decode_run``.
Reported: per variant the median over rounds of ms per step, and after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402

CASES = ((1, 128, 256), (1, 2048, 256), (64, 2048, 64))

WORKER = """
import json, sys
sys.path.insert(0, {bench!r})
import torch, layerzero_serve
from bench_decode_gpu import decode_run
from layerzero_serve.engine import Engine
eng = Engine(model="dummy:llama3-8b", dtype="bfloat16", max_model_len=4096, max_num_seqs=64,
             max_num_batched_tokens=8192)
res = {{"file": layerzero_serve.__file__}}
for batch, ctx, tokens in {cases!r}:
    decode_run(eng, batch, ctx, 16)  # warm-up of this shape
    res[f"b{{batch}}_ctx{{ctx}}"] = decode_run(eng, batch, ctx, tokens)
print("RESULT " + json.dumps(res))
"""


def run_variant(site: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    code = WORKER.format(bench=str(Path(__file__).resolve().parent), cases=CASES)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd="/tmp", capture_output=True, text=True
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"variant at {site} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", action="append", required=True, help="NAME=FOLDER (twice)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sites = [s.split("=", 1) for s in args.site]
    if len(sites) != 2 or any(len(s) != 2 for s in sites):
        ap.error("--site NAME=FOLDER, exactly twice")
    (a, pa), (b, pb) = sites
    runs: dict[str, list[dict]] = {a: [], b: []}
    for r in range(args.rounds):
        order = [(a, pa), (b, pb)] if r % 2 == 0 else [(b, pb), (a, pa)]  # ABBA...
        for name, site in order:
            res = run_variant(site)
            runs[name].append(res)
            print(name, json.dumps({k: v["step_ms"] for k, v in res.items() if k != "file"}))
    summary = {}
    for batch, ctx, _ in CASES:
        key = f"b{batch}_ctx{ctx}"
        med = {n: statistics.median(x[key]["step_ms"] for x in runs[n]) for n in (a, b)}
        host = {
            n: statistics.median(x[key]["schedule_update_us_per_step"] for x in runs[n])
            for n in (a, b)
        }
        summary[key] = {
            "step_ms_median": med,
            f"{b}_over_{a}": med[b] / med[a],
            "schedule_update_us_median": host,
        }
        print(key, json.dumps(summary[key]))
    doc = {"rounds": args.rounds, "order": "ABBA...", "summary": summary, "runs": runs}
    print("wrote", write_result("commit_ab_gpu", doc, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
