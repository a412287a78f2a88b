"""Per-step wall times of plain vs adaptive-k (n-gram) decoding, random prompts, batch 8 and 32
(dummy:llama3-8b, bf16, graphs, async scheduling): the mean per-step difference over 8
alternating pairs, and when the proposer was asked and for how long. Diagnoses where an
adaptive run loses or gains against plain decoding.

    python bench/spec_step_diff_gpu.py REPO_ROOT
"""

import sys
import time

sys.path.insert(0, sys.argv[1] + "/bench")
import bench_spec_gpu as b
import numpy as np
from common import install_speculation

from layerzero_serve.engine import Engine
from layerzero_serve.sampling import SamplingParams

eng = Engine(
    model="dummy:llama3-8b",
    device="auto",
    dtype="bfloat16",
    max_model_len=1024,
    max_num_seqs=64,
    max_num_batched_tokens=8192,
    speculative_method="ngram",
    num_speculative_tokens=4,
    adaptive_speculation=False,
)
spec = eng.spec
b._use_ngram(spec)
rng = np.random.default_rng(0)
calls = []
orig = spec.proposer.propose


def timed(*a, **k):
    t = time.perf_counter()
    r = orig(*a, **k)
    calls.append((len(times), time.perf_counter() - t))
    return r


spec.proposer.propose = timed
times = []


def run(adaptive, prompts):
    global times
    times = []
    install_speculation(eng, spec if adaptive else None)
    spec.adaptive = spec.new_adaptive() if adaptive else None
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, params)
    t = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
        n = time.perf_counter()
        times.append(n - t)
        t = n
    install_speculation(eng, None)
    return times


for batch in (8, 32):
    res = {True: [], False: []}
    for i in range(9):
        prompts = [rng.integers(0, eng.vocab_size, size=64).tolist() for _ in range(batch)]
        for a in (False, True) if i % 2 else (True, False):
            calls.clear()
            t = run(a, prompts)
            if i:
                res[a].append(t)
            if a and i == 1:
                print("proposer calls (step, us):", [(s, round(d * 1e6)) for s, d in calls])
    P = np.array(res[False])
    A = np.array(res[True])
    d = (A - P).mean(0) * 1e6
    print(
        f"batch {batch}: steps {P.shape[1]}, total plain {P.sum(1).mean() * 1e3:.3f} ms",
        f"adaptive {A.sum(1).mean() * 1e3:.3f} ms, diff {d.sum():.0f} us",
    )
    print(" step medians plain/adaptive us:", round(np.median(P) * 1e6), round(np.median(A) * 1e6))
    idx = np.argsort(-np.abs(d))[:12]
    print(
        " largest per-step mean diffs (step, us):",
        [(int(j), round(float(d[j]))) for j in sorted(idx)],
    )
    print(
        " first 6 steps plain:",
        [round(x) for x in P.mean(0)[:6] * 1e6],
        "adaptive:",
        [round(x) for x in A.mean(0)[:6] * 1e6],
    )
    print(
        " last 4 steps plain:",
        [round(x) for x in P.mean(0)[-4:] * 1e6],
        "adaptive:",
        [round(x) for x in A.mean(0)[-4:] * 1e6],
    )
