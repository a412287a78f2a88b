"""examples/standalone_sampler.py: greedy rows (plain, penalised, biased) equal the argmax of the
logits processed here by hand; seeded rows give the same token reversed, in a larger shuffled
batch and alone; sampled rows stay inside their filters; many draws of one row follow the exact
filtered distribution computed here in float64 (chi-square); prepare/sample in a loop agrees
with the one-call API."""

from __future__ import annotations

import numpy as np
import torch
from example_loader import load_example
from scipy import stats

from layerzero_serve.sampling import Sampler


def exact_distribution(logits, p) -> np.ndarray:
    """float64 temperature -> top-k -> top-p (on the top-k mass) -> min-p -> renormalise."""
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64) / p.temperature, 0).numpy()
    order = np.argsort(-probs, kind="stable")  # descending, lower id first on ties
    ranked = probs[order]
    keep = np.arange(len(ranked)) < (p.top_k if p.top_k > 0 else len(ranked))
    kept_mass = ranked[keep].sum()
    before = np.concatenate([[0.0], np.cumsum(np.where(keep, ranked, 0.0))[:-1]])
    keep &= (before < p.top_p * kept_mass) | (p.top_p >= 1.0)
    keep &= ranked >= p.min_p * ranked[0]
    out = np.zeros_like(probs)
    out[order[keep]] = ranked[keep]
    return out / out.sum()


def processed(row: torch.Tensor, p, prompt, output) -> torch.Tensor:
    """Logit bias, then repetition / frequency / presence penalties (the sampler's order)."""
    x = row.clone().double()
    for t, b in p.logit_bias:
        x[t] += b
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    return x


def test_rows_greedy_seeded_and_filtered():
    res = load_example("standalone_sampler").main()
    logits, params, tokens = res["logits"], res["params"], res["tokens"]
    names = list(params)
    for i, name in enumerate(names):
        p = params[name]
        if p.is_greedy:
            x = processed(logits[i], p, res["prompt"], res["output"])
            assert tokens[name] == int(torch.argmax(x)), name
    assert tokens["greedy"] == int(torch.argmax(logits[0]))
    assert tokens["bias"] == 7
    assert tokens["penalties"] != tokens["greedy"]  # the penalties changed the winner

    assert res["tokens_in_other_batch"] == tokens  # reversed, extended, shuffled
    for i, name in enumerate(names):  # and alone, in a fresh sampler
        alone = Sampler(seed=12345)(
            logits[i : i + 1],
            params[name],
            prompt_token_ids=[res["prompt"]],
            output_token_ids=[res["output"]],
        )
        assert params[name].seed is not None or params[name].is_greedy
        assert alone.tokens == [tokens[name]], name
        if not params[name].is_greedy:
            law = exact_distribution(logits[i].tolist(), params[name])
            assert law[tokens[name]] > 0, name  # inside the row's top-k / top-p / min-p set


def test_many_draws_follow_the_exact_distribution():
    res = load_example("standalone_sampler").main()
    d = res["draws"]
    law = exact_distribution(d["logits"], d["params"])
    counts = np.array(d["counts"])
    n = counts.sum()
    assert np.all(counts[law == 0] == 0)  # nothing outside the filtered set
    assert np.count_nonzero(law) == 4  # top-p on the top-k mass (see the example)
    kept = law > 0
    assert stats.chisquare(counts[kept], law[kept] * n).pvalue > 1e-3


def test_decode_loop_matches_the_one_call_api():
    mod = load_example("standalone_sampler")
    loop = mod.decode_loop()
    for step, tok in enumerate(loop):
        host = Sampler()(
            mod.model_logits(1, seed=step),
            mod.LOOP_PARAMS,
            prompt_token_ids=[mod.PROMPT],
            output_token_ids=[loop[:step]],
        )
        assert host.tokens == [tok]
