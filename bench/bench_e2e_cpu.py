"""End-to-end generation throughput on the CPU, with the host time split into scheduling,
input preparation, model forward, sampling and update, so later work can see where it goes.

Models: the embedded default model (tiny) and ``dummy:llama3.2-1b`` (fp32, random weights), at
batch 1 and batch 32, greedy, ``--new-tokens`` tokens after ``--prompt-len`` prompt tokens.

    python bench/bench_e2e_cpu.py [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write_result  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402


def run_case(model: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    eng = Engine(
        model=model,
        device="cpu",
        dtype="float32",
        max_num_seqs=max(batch, 1),
        max_num_batched_tokens=max(2048, batch * prompt_len),
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    vocab = eng.vocab_size
    walls, splits = [], []
    for rep in range(repeats + 1):  # the first run warms up and is not counted
        before = eng.runner.timings.as_dict()
        t0 = time.perf_counter()
        for b in range(batch):
            # Distinct prompts (no prefix hits): the forward does the whole prompt.
            prompt = [(rep * 7919 + b * 104729 + i * 31) % vocab for i in range(prompt_len)]
            eng.add_request(prompt, params)
        while eng.has_unfinished():
            eng.step()
        wall = time.perf_counter() - t0
        after = eng.runner.timings.as_dict()
        if rep:
            walls.append(wall)
            splits.append({k: after[k] - before[k] for k in after})
    wall = statistics.median(walls)
    split = {k: statistics.median(s[k] for s in splits) for k in splits[0]}
    gen = batch * new_tokens
    return {
        "model": model,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "wall_s_median": wall,
        "generated_tokens_per_s": gen / wall,
        "time_split_s": split,
        "time_split_fraction": {k: v / wall for k, v in split.items()},
        "repeats": repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--skip-1b", action="store_true", help="only the tiny model")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cases = [("default", 1), ("default", 32)]
    if not args.skip_1b:
        cases += [("dummy:llama3.2-1b", 1), ("dummy:llama3.2-1b", 32)]
    results = []
    for model, batch in cases:
        r = run_case(
            model,
            batch,
            args.prompt_len,
            args.new_tokens,
            args.repeats if "1b" not in model else max(1, args.repeats - 2),
        )
        frac = ", ".join(f"{k} {v:.1%}" for k, v in r["time_split_fraction"].items())
        print(f"{model:20s} batch {batch:3d}: {r['generated_tokens_per_s']:8.1f} tok/s  ({frac})")
        results.append(r)
    print("wrote", write_result("e2e_cpu", {"cases": results}, args.out))


if __name__ == "__main__":
    main()
