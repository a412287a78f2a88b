"""Logits processing (penalties, logit bias, allowed / bad ids, min-tokens) against the float64
reference, the per-request device tables across steps (top-ups, slot reuse and eviction), and
degenerate rows (NaN, +inf, all -inf) failing alone while the other rows stay bitwise equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sampling_reference import process_logits as ref_process

from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.sampling._processors import FAILURE_DETAILS, process_logits
from layerzero_serve.sampling._rows import CallRow

V = 64
EOS = 2


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: on a 2-core VM torch's thread wake-ups cost more than they save."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _processed(sampler: Sampler, logits: torch.Tensor, rows: list[CallRow]) -> torch.Tensor:
    batch = sampler.prepare(rows)
    return process_logits(logits, batch, sampler.tables)


def _ref(logits, p: SamplingParams, prompt, output, eos=EOS) -> np.ndarray:
    active = len(output) < p.min_tokens
    suppress = ({eos} | set(p.stop_token_ids)) if active else set()
    return ref_process(
        logits,
        prompt=prompt,
        output=output,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logit_bias=dict(p.logit_bias),
        allowed=p.allowed_token_ids,
        bad=p.bad_token_ids,
        suppress=suppress,
    )


PARAMS = [
    SamplingParams(repetition_penalty=2.0),
    SamplingParams(repetition_penalty=0.5, frequency_penalty=0.25),
    SamplingParams(presence_penalty=-1.5, frequency_penalty=1.0, repetition_penalty=4.0),
    SamplingParams(logit_bias={1: 2.5, 7: -100.0, 9: 0.125}),
    SamplingParams(allowed_token_ids=[3, 4, 5, 9], logit_bias={4: 1.0, 10: 3.0}),
    SamplingParams(bad_token_ids=[0, 1, 30], repetition_penalty=0.25, presence_penalty=0.5),
    SamplingParams(min_tokens=5, stop_token_ids=[11, 12], repetition_penalty=2.0),
    SamplingParams(temperature=0.0),  # no processing at all
]


def _dyadic_rows(rng, n):
    """Logits multiples of 1/8, penalties powers of two and dyadic biases: every float32 op is
    exact, so float32 processing must equal the float64 reference bit for bit."""
    logits = rng.integers(-32, 33, (n, V)).astype(np.float32) / 8
    prompts = [rng.integers(0, V, rng.integers(1, 12)).tolist() for _ in range(n)]
    outputs = [rng.integers(0, V, rng.integers(0, 9)).tolist() for _ in range(n)]
    return logits, prompts, outputs


def test_processing_matches_float64_reference_exactly():
    rng = np.random.default_rng(0)
    logits, prompts, outputs = _dyadic_rows(rng, len(PARAMS) * 4)
    params = [PARAMS[i % len(PARAMS)] for i in range(len(logits))]
    rows = [
        CallRow(i, p, prompts[i], prompts[i] + outputs[i], eos_token_id=EOS)
        for i, p in enumerate(params)
    ]
    got = _processed(Sampler().bind("cpu", V), torch.from_numpy(logits), rows).numpy()
    for i, p in enumerate(params):
        ref = _ref(logits[i], p, prompts[i], outputs[i]).astype(np.float32)
        np.testing.assert_array_equal(got[i], ref, err_msg=str(p))


def test_processing_random_values_and_greedy_choice():
    rng = np.random.default_rng(1)
    n = 200
    logits = rng.normal(0, 3, (n, V)).astype(np.float32)
    prompts = [rng.integers(0, V, 6).tolist() for _ in range(n)]
    outputs = [rng.integers(0, V, rng.integers(0, 9)).tolist() for _ in range(n)]
    params = [
        SamplingParams(
            temperature=0.0,
            repetition_penalty=float(rng.uniform(0.5, 2)),
            presence_penalty=float(rng.uniform(-2, 2)),
            frequency_penalty=float(rng.uniform(-2, 2)),
            logit_bias={int(rng.integers(V)): float(rng.uniform(-5, 5))},
        )
        for _ in range(n)
    ]
    sampler = Sampler().bind("cpu", V)
    rows = [CallRow(i, params[i], prompts[i], prompts[i] + outputs[i]) for i in range(n)]
    got = _processed(sampler, torch.from_numpy(logits), rows).numpy()
    tokens = sampler.sample(torch.from_numpy(logits), sampler.prepare(rows)).tokens.numpy()
    for i in range(n):
        ref = _ref(logits[i], params[i], prompts[i], outputs[i])
        np.testing.assert_allclose(got[i], ref, rtol=1e-6, atol=1e-5)
        top2 = np.sort(ref)[-2:]
        if top2[1] - top2[0] > 1e-4:  # no near tie: the greedy choice is the reference's
            assert tokens[i] == int(np.argmax(ref))


def test_tables_follow_the_requests_over_steps_with_slot_eviction():
    """Three penalised requests, a sampler with room for two: slots are evicted and rebuilt from
    the host tokens, and each step's processed logits still equal the reference."""
    rng = np.random.default_rng(2)
    sampler = Sampler(max_num_seqs=2).bind("cpu", V)
    params = [PARAMS[0], PARAMS[2], PARAMS[6]]
    reqs = [
        CallRow(f"r{i}", p, [5, 6, i], [5, 6, i], eos_token_id=EOS) for i, p in enumerate(params)
    ]
    for step in range(12):
        chosen = sorted(rng.choice(3, size=int(rng.integers(1, 3)), replace=False).tolist())
        batch_rows = [reqs[i] for i in chosen]
        logits = rng.normal(0, 2, (len(batch_rows), V)).astype(np.float32)
        got = _processed(sampler, torch.from_numpy(logits), batch_rows).numpy()
        for j, r in enumerate(batch_rows):
            out = r.all_token_ids[len(r.prompt_token_ids) :]
            ref = _ref(logits[j], r.sampling_params, r.prompt_token_ids, out)
            np.testing.assert_allclose(got[j], ref, rtol=1e-6, atol=1e-5, err_msg=f"step {step}")
            r.all_token_ids.append(int(rng.integers(0, V)))  # the "sampled" token
    for r in reqs:
        sampler.release(r.request_id)
    assert not sampler._states and len(sampler.tables._free) == 2


def test_min_tokens_suppresses_eos_and_stop_ids_then_releases():
    logits = torch.full((1, V), -4.0)
    logits[0, [EOS, 11]] = 10.0  # EOS and a stop id dominate
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[11])
    sampler = Sampler()
    for n_out in range(5):
        out = [20] * n_out
        tok = sampler(logits, p, prompt_token_ids=[[1]], output_token_ids=[out], eos_token_id=EOS)
        assert (tok.tokens[0] not in (EOS, 11)) == (n_out < 3)
    ignore = SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True)
    tok = sampler(logits, ignore, output_token_ids=[[]], eos_token_id=EOS)
    assert tok.tokens[0] == EOS  # EOS is no stop token here: min_tokens does not touch it


def test_allowed_and_bad_ids_are_respected():
    rng = np.random.default_rng(3)
    logits = torch.tensor(rng.normal(0, 1, (2000, V)), dtype=torch.float32)
    allowed = SamplingParams(temperature=2.0, allowed_token_ids=[3, 5, 8, 13], bad_token_ids=[5])
    bad = SamplingParams(temperature=2.0, top_k=10, bad_token_ids=list(range(0, V, 2)))
    out = Sampler(seed=3)(logits, [allowed, bad] * 1000).tokens
    assert set(out[0::2]) == {3, 8, 13}
    assert all(t % 2 == 1 for t in out[1::2])


def _degenerate_batch():
    rng = np.random.default_rng(4)
    logits = torch.tensor(rng.normal(0, 2, (8, V)), dtype=torch.float32)
    params = [
        SamplingParams(top_k=10, top_p=0.9, logprobs=3),
        SamplingParams(temperature=0.0, logprobs=2, logprobs_mode="processed"),
        SamplingParams(min_p=0.1, seed=5, repetition_penalty=1.3),
        SamplingParams(logit_bias={4: 3.0}, logprobs=0),
    ] * 2
    return logits, params


@pytest.mark.parametrize(
    ("row", "value", "flag"),
    [(1, float("nan"), 1), (2, float("inf"), 1), (5, float("-inf"), 2), (6, "nan_all", 1)],
)
def test_degenerate_row_fails_alone_others_bitwise_equal(row, value, flag):
    logits, params = _degenerate_batch()
    seeds = list(range(100, 108))
    clean = Sampler(seed=9)(logits, params, seeds=seeds, prompt_token_ids=[[1, 2]] * 8)
    bad = logits.clone()
    if value == "nan_all":
        bad[row] = float("nan")
    elif value == float("-inf"):
        bad[row] = value
    else:
        bad[row, 7] = value
    got = Sampler(seed=9)(bad, params, seeds=seeds, prompt_token_ids=[[1, 2]] * 8)
    assert got.failed == {row: FAILURE_DETAILS[flag]}
    for i in range(8):
        if i != row:
            assert got.tokens[i] == clean.tokens[i]
            assert got.logprobs[i] == clean.logprobs[i]  # floats compared exactly


def test_masks_that_leave_nothing_fail_the_row():
    # the only allowed token is EOS, and min_tokens forbids EOS: every logit is -inf
    p = SamplingParams(allowed_token_ids=[EOS], min_tokens=2)
    got = Sampler()(torch.zeros(2, V), [p, SamplingParams()], eos_token_id=EOS)
    assert got.failed == {0: FAILURE_DETAILS[2]} and "-inf" in got.failed[0]
