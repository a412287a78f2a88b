"""The sampler on its own, on logits from any source (your model, a server's output, a file).

* ``Sampler()(logits, params, seeds=..., prompt_token_ids=..., output_token_ids=...)``: one call
  per batch, one ``SamplingParams`` per row (greedy, temperature, top-k / top-p / min-p,
  repetition / presence / frequency penalties, logit bias). A row's random number depends on its
  seed and its offset (the length of its output so far) only, so a seeded row draws the same
  token at any batch position and with any batch mates.
* ``bind`` / ``prepare`` / ``sample`` / ``to_host``: the same sampler in a decode loop over
  request objects, the way an engine uses it (``sample`` is CUDA-graph safe: no host sync).

Runs on the CPU (``python examples/standalone_sampler.py``) in about a second.
"""

from __future__ import annotations

import numpy as np
import torch

from layerzero_serve.sampling import HostSample, Sampler, SamplingParams
from layerzero_serve.types import Request

VOCAB = 1000
PROMPT = [11, 12, 13, 14]
OUTPUT = [12, 40, 40]  # what each row generated so far (its offset is 3)

ROWS = {  # name -> SamplingParams of that row
    "greedy": SamplingParams(temperature=0.0),
    "top_k": SamplingParams(temperature=0.8, top_k=20, seed=1),
    "top_p": SamplingParams(temperature=1.0, top_p=0.9, seed=2),
    "min_p": SamplingParams(temperature=1.2, min_p=0.1, seed=3),
    "all_filters": SamplingParams(temperature=0.7, top_k=50, top_p=0.8, min_p=0.02, seed=4),
    "penalties": SamplingParams(
        temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3
    ),
    "bias": SamplingParams(temperature=0.0, logit_bias={7: 100.0}),
}


def model_logits(num_rows: int, seed: int) -> torch.Tensor:
    """Stand-in for any model: float32 ``[num_rows, VOCAB]`` on the CPU."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, VOCAB, generator=g) * 3
    logits[:, PROMPT[1]] += 12.0  # token 12 (in prompt and output) leads: penalties matter
    return logits


def sample_rows(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams]) -> HostSample:
    n = len(params)
    return sampler(logits, params, prompt_token_ids=[PROMPT] * n, output_token_ids=[OUTPUT] * n)


def batch_independence(sampler: Sampler, logits: torch.Tensor) -> dict:
    """The same rows reversed, then mixed with unseeded strangers: seeded tokens do not move."""
    names = list(ROWS)
    order = names[::-1] + ["stranger"] * 3
    strangers = model_logits(3, seed=99)
    mixed = torch.cat([logits.flip(0), strangers])
    params = [ROWS[n] for n in names[::-1]] + [SamplingParams(temperature=1.0)] * 3
    idx = np.random.default_rng(0).permutation(len(order)).tolist()  # shuffle it too
    host = sample_rows(sampler, mixed[idx], [params[i] for i in idx])
    return {order[i]: t for i, t in zip(idx, host.tokens, strict=True) if order[i] != "stranger"}


def draws_of_one_row(sampler: Sampler, params: SamplingParams, num_draws: int) -> dict:
    """Many seeded draws of one 8-token row (one batch, seeds 0..n-1): a histogram to compare
    with the exact filtered distribution. At temperature 0.8 the row's probabilities are about
    0.30, 0.22, 0.16, 0.12, 0.08, ...: top-k 6 keeps 94% of the mass, and top-p 0.83 on that
    renormalised mass keeps 4 tokens (5 if it were taken on the whole vocabulary)."""
    row = torch.tensor([-0.963, -1.211, -1.466, -1.696, -2.021, -2.251, -2.575, -3.13])
    logits = row.expand(num_draws, row.numel())
    host = sampler(logits, params, seeds=list(range(num_draws)))
    counts = np.bincount(host.tokens, minlength=row.numel())
    return {"logits": row.tolist(), "params": params, "counts": counts.tolist()}


LOOP_PARAMS = SamplingParams(temperature=0.9, top_p=0.95, frequency_penalty=0.5, seed=5)


def decode_loop(steps: int = 6) -> list[int]:
    """``prepare`` / ``sample`` over a request whose output grows each step (offset, counts)."""
    sampler = Sampler(seed=0).bind("cpu", VOCAB)  # device, vocabulary size: buffers, tables
    req = Request("r0", list(PROMPT), max_tokens=steps, sampling_params=LOOP_PARAMS)
    for step in range(steps):
        batch = sampler.prepare([req])  # host: one H2D copy, not captured
        out = sampler.sample(model_logits(1, seed=step), batch)  # device, graph-safe
        req.all_token_ids.append(out.to_host().tokens[0])  # the step's one D2H copy
    sampler.release("r0")
    return req.output_token_ids


def main() -> dict:
    sampler = Sampler(seed=0)  # the seed only feeds unseeded rows
    logits = model_logits(len(ROWS), seed=0)
    tokens = dict(zip(ROWS, sample_rows(sampler, logits, list(ROWS.values())).tokens, strict=True))
    for name, tok in tokens.items():
        print(f"{name:>12}: token {tok}")
    moved = batch_independence(sampler, logits)
    same = all(moved[n] == tokens[n] for n in moved)
    print("seeded rows give the same tokens reversed and in a larger shuffled batch:", same)

    filtered = SamplingParams(temperature=0.8, top_k=6, top_p=0.83, min_p=0.1)
    draws = draws_of_one_row(sampler, filtered, num_draws=20000)
    print("20000 draws of one row, top-k 6, top-p 0.83, min-p 0.1:", draws["counts"])
    loop = decode_loop()
    print("decode loop with prepare/sample:", loop)
    return {
        "logits": logits,
        "params": ROWS,
        "prompt": PROMPT,
        "output": OUTPUT,
        "tokens": tokens,
        "tokens_in_other_batch": moved,
        "draws": draws,
        "decode_loop": loop,
    }


if __name__ == "__main__":
    main()
