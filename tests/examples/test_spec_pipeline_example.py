"""examples/spec_pipeline.py: greedy output with the user's proposer equals the same engine
without speculation (run here, independently), in fewer steps, with metrics that add up; the
verifier used on its own follows an argmax walk over the toy logits for greedy rows, and
rejection sampling against the user's draft distribution emits the target's law."""

from __future__ import annotations

import math

import numpy as np
from example_loader import load_example
from scipy import stats

from layerzero_serve import SamplingParams
from layerzero_serve.engine import Engine


def plain_decoding(prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], int]:
    eng = Engine(model="dummy:tiny", device="cpu")  # no speculation
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    return [got[i] for i in ids], eng.stats()["steps"]


def test_user_proposer_keeps_greedy_output_and_saves_steps():
    res = load_example("spec_pipeline").main()
    ref, plain_steps = plain_decoding(res["prompts"], res["max_tokens"])
    assert res["tokens"] == ref
    assert all(len(t) == res["max_tokens"] for t in res["tokens"])

    s = res["speculative"]
    assert s["method"] == "follower"
    drafted, accepted = s["drafted_tokens"], s["accepted_tokens"]
    assert 0 < accepted <= drafted
    assert math.isclose(s["acceptance_rate"], accepted / drafted)
    assert math.isclose(s["mean_accepted_length"] * s["drafts"], accepted)
    rates = np.array(s["acceptance_rate_per_position"], dtype=float)
    assert len(rates) == s["k_max"] and np.all((rates >= 0) & (rates <= 1))
    assert res["steps"] < plain_steps  # accepted drafts replace decode steps...
    assert plain_steps - res["steps"] <= accepted  # ...one step at most per accepted token


def test_verifier_and_rejection_sampling_on_toy_inputs():
    mod = load_example("spec_pipeline")
    toy = mod.verifier_on_toy_logits()
    table = toy["table"]
    (greedy_drafts, sampled_drafts), (greedy_out, sampled_out) = toy["drafts"], toy["tokens"]
    expect, cur = [], toy["contexts"][0][-1]  # greedy: walk the argmax while drafts agree
    for d in [*greedy_drafts, None]:
        best = int(table[cur].argmax())
        expect.append(best)
        if d != best:
            break
        cur = d
    assert greedy_out == expect
    assert 1 <= len(sampled_out) <= len(sampled_drafts) + 1
    assert sampled_out[:-1] == sampled_drafts[: len(sampled_out) - 1]
    assert 0 <= sampled_out[-1] < table.shape[1]

    rs = mod.rejection_on_toy_distributions()
    p = np.array(rs["p"], dtype=np.float64)
    q = np.array(rs["q"], dtype=np.float64)
    n, counts = rs["num_rows"], np.array(rs["first_token_counts"])
    assert counts.sum() == n
    assert stats.chisquare(counts, p / p.sum() * n).pvalue > 1e-3
    a = np.minimum(p, q).sum()  # acceptance probability of the first draft
    assert abs(rs["accepted_first"] - a * n) < 5 * math.sqrt(n * a * (1 - a))
