"""Logprobs of sampled tokens against float64 references: raw (log-softmax of the model's
logits) and processed (log of the distribution actually sampled from), the rank, the top-n
(n = 0..20), and rows of both modes in one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sampling_reference import filtered_probs
from test_sampling_reference import process_logits as ref_process

from layerzero_serve.sampling import Sampler, SamplingParams

V = 40


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: on a 2-core VM torch's thread wake-ups cost more than they save."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x[np.isfinite(x)].max()
    return x - (m + np.log(np.exp(x - m).sum()))


def _check(entry, ref_lp: np.ndarray, token: int, n: int) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(ref_lp[token], abs=2e-5)
    assert entry.rank == 1 + int((ref_lp > ref_lp[token] + 1e-5).sum())
    assert len(entry.top_token_ids) == n == len(entry.top_logprobs)
    order = np.argsort(-ref_lp, kind="stable")
    np.testing.assert_allclose(entry.top_logprobs, ref_lp[order[:n]], atol=2e-5)
    for tok, lp in zip(entry.top_token_ids, entry.top_logprobs, strict=True):
        assert ref_lp[tok] == pytest.approx(lp, abs=2e-5)


def test_raw_and_processed_logprobs_match_float64():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, V)).astype(np.float32)
    params = [
        SamplingParams(logprobs=5),
        SamplingParams(logprobs=20, top_k=7, top_p=0.9, logprobs_mode="processed"),
        SamplingParams(logprobs=0, temperature=0.7, min_p=0.05, logprobs_mode="processed"),
        SamplingParams(
            logprobs=3,
            temperature=0.0,
            repetition_penalty=2.0,
            logit_bias={1: 3.0},
            logprobs_mode="processed",
        ),  # fmt: skip
        SamplingParams(logprobs=2, temperature=0.0, repetition_penalty=2.0),  # raw: unpenalised
        SamplingParams(),  # no logprobs
    ]
    prompts = [[1, 2, 3]] * 6
    out = Sampler(seed=1)(torch.from_numpy(logits), params, prompt_token_ids=prompts)
    assert out.logprobs[5] is None
    for i in (0, 4):
        _check(out.logprobs[i], _log_softmax64(logits[i]), out.tokens[i], params[i].logprobs)
    for i in (1, 2):
        p = params[i]
        with np.errstate(divide="ignore"):
            ref = np.log(filtered_probs(logits[i], p.temperature, p.top_k, p.top_p, p.min_p))
        entry = out.logprobs[i]
        assert np.isfinite(entry.logprob) and entry.logprob == pytest.approx(
            ref[out.tokens[i]], abs=2e-5
        )
        kept = int(np.isfinite(ref).sum())
        top = entry.top_logprobs
        assert len(top) == p.logprobs and kept < V
        assert all(np.isfinite(top[:kept])) and all(np.isneginf(top[kept:]))
        m = min(kept, p.logprobs)
        np.testing.assert_allclose(top[:m], np.sort(ref)[::-1][:m], atol=2e-5)
    processed = ref_process(
        logits[3], prompt=[1, 2, 3], repetition_penalty=2.0, logit_bias={1: 3.0}
    )
    _check(out.logprobs[3], _log_softmax64(processed), out.tokens[3], 3)
    assert out.tokens[3] == int(np.argmax(processed))
