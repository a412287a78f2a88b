"""n-gram speculative decoding on real text (CPU): SmolLM2-135M-Instruct (GGUF, float32, one
thread) on copy-heavy chat tasks (repeat a paragraph, edit code), greedy.

For each ``k`` in ``--k``: drafted and accepted token counts, acceptance rate, mean accepted
length, and the wall time against plain greedy decoding of the same prompts; the speculative
output must be token-identical to the plain one (asserted: n-gram drafting with greedy
verification is lossless).

    python bench/bench_spec_real_cpu.py [--new-tokens 96] [--repeats 2] [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_real_model_cpu import GGUF, gguf_path  # noqa: E402
from common import write_result  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402
from layerzero_serve.tokenizer import Tokenizer  # noqa: E402

PARAGRAPH = (
    "The Eiffel Tower was built for the 1889 World's Fair in Paris. At first many artists "
    "criticised its design, but it soon became a symbol of France and one of the most visited "
    "monuments in the world. It is about 330 metres tall and was the tallest man-made "
    "structure until 1930."
)
CODE = """def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total * (1 + tax_rate)
    return round(total, 2)
"""
TASKS = [
    f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    f"Rename the function below to compute_total and return the code:\n\n{CODE}",
]


def prompts(path: Path) -> list[list[int]]:
    """Token ids of each task in the model's chat template (with the generation prompt)."""
    chats = [[{"role": "user", "content": t}] for t in TASKS]
    return Tokenizer.from_pretrained(path).apply_chat_template(chats, add_generation_prompt=True)


def run(path: Path, rows: list[list[int]], new_tokens: int, repeats: int, k: int | None) -> dict:
    spec = {} if k is None else {"speculative_method": "ngram", "num_speculative_tokens": k}
    eng = Engine(
        model=str(path),
        device="cpu",
        dtype="float32",
        cpu_threads=1,
        num_kv_blocks=256,
        enable_prefix_caching=False,
        **spec,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    walls, outs = [], None
    for rep in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        rids = [eng.add_request(p, params) for p in rows]
        got: dict[str, list[int]] = {r: [] for r in rids}
        while eng.has_unfinished():
            for o in eng.step():
                got[o.request_id].extend(o.new_token_ids)
        if rep:
            walls.append(time.perf_counter() - t0)
        outs = [got[r] for r in rids]
    stats = eng.stats()["speculative"]  # counters over every run (warm-up included)
    return {"wall_s_median": statistics.median(walls), "tokens": outs, "spec": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = gguf_path()
    rows = prompts(path)
    results = []
    for batch in (1, len(rows)):
        sub = rows[:batch]
        plain = run(path, sub, args.new_tokens, args.repeats, None)
        generated = sum(len(t) for t in plain["tokens"])
        entry = {
            "batch": batch,
            "prompt_lens": [len(p) for p in sub],
            "generated_tokens": generated,
            "plain_wall_s": plain["wall_s_median"],
            "plain_tokens_per_s": generated / plain["wall_s_median"],
            "speculative": [],
        }
        for k in args.k:
            spec = run(path, sub, args.new_tokens, args.repeats, k)
            assert spec["tokens"] == plain["tokens"], f"k={k}: output differs from plain greedy"
            s = spec["spec"]
            speedup = plain["wall_s_median"] / spec["wall_s_median"]
            entry["speculative"].append(
                {
                    "k": k,
                    "wall_s": spec["wall_s_median"],
                    "tokens_per_s": generated / spec["wall_s_median"],
                    "speedup_vs_plain": speedup,
                    "drafted_tokens": s["drafted_tokens"],
                    "accepted_tokens": s["accepted_tokens"],
                    "acceptance_rate": s["acceptance_rate"],
                    "mean_accepted_length": s["mean_accepted_length"],
                    "identical_to_plain_greedy": True,
                }
            )
            print(
                f"batch {batch} k={k}: {speedup:.2f}x vs plain, accepted "
                f"{s['accepted_tokens']}/{s['drafted_tokens']} drafted "
                f"({s['acceptance_rate']:.0%}), identical output"
            )
        results.append(entry)
    payload = {
        "model": GGUF,
        "dtype": "float32",
        "threads": 1,
        "new_tokens_max": args.new_tokens,
        "tasks": ["repeat a paragraph", "rename a function in code"],
        "counts_note": "drafted/accepted counters include the warm-up run",
        "cases": results,
    }
    print("wrote", write_result("spec_real_cpu", payload, args.out))


if __name__ == "__main__":
    main()
