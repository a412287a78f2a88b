"""An independent float64 NumPy reference of the sampling semantics (imported by the other
sampling tests), and checks of the reference itself on hand-computed cases.

Semantics: logits -> token mask (bias, allowed, bad) -> min-tokens mask -> penalties
(repetition over prompt + output, frequency and presence over the output) -> greedy argmax, or
temperature -> softmax -> rank by descending probability (lower id first on ties) -> top-k ->
top-p on the renormalised top-k set (keep j iff the mass before j < top_p) -> min-p relative to
the most likely token -> renormalise.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

MARGIN = 1e-4  # the reference refuses top-p / min-p cuts closer than this (rounding-ambiguous)


def process_logits(
    logits,
    *,
    prompt=(),
    output=(),
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    logit_bias=None,
    allowed=None,
    bad=(),
    suppress=(),
) -> np.ndarray:
    """float64 processed logits (``suppress``: the ids min-tokens masks this step)."""
    x = np.asarray(logits, dtype=np.float64).copy()
    vocab = x.shape[0]
    for tok, b in (logit_bias or {}).items():
        x[tok] += b
    if allowed is not None:
        mask = np.full(vocab, True)
        mask[list(allowed)] = False
        x[mask] = -np.inf
    x[list(bad)] = -np.inf
    x[list(suppress)] = -np.inf
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=vocab).astype(np.float64)
    seen = counts > 0
    seen[list(prompt)] = True
    with np.errstate(invalid="ignore"):
        penalised = np.where(x > 0, x / repetition_penalty, x * repetition_penalty)
    x = np.where(seen, penalised, x)
    x = x - frequency_penalty * counts - presence_penalty * (counts > 0)
    return x


def filtered_probs(
    logits,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    *,
    top_p_inclusive=False,  # mutation: keep j iff the mass up to and including j <= top_p
    top_p_one_extra=False,  # mutation: one token more than the correct top-p set
    top_k_delta=0,  # mutation: top-k off by this many
    top_p_before_top_k=False,  # mutation: top-p on the full (not top-k renormalised) dist
    min_p_absolute=False,  # mutation: keep p >= min_p instead of p >= min_p * p_max
    check_margin=True,
) -> np.ndarray:
    """The distribution a row is sampled from (greedy: one-hot at the lowest-id argmax)."""
    x = np.asarray(logits, dtype=np.float64)
    vocab = x.shape[0]
    out = np.zeros(vocab)
    if temperature == 0 or top_k == 1:
        out[int(np.argmax(x))] = 1.0  # np.argmax: first (lowest) index among ties
        return out
    z = x / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.array(sorted(range(vocab), key=lambda i: (-p[i], i)))
    p = p[order]
    ranks = np.arange(vocab)
    k = vocab if top_k <= 0 else min(top_k, vocab)
    k = max(1, min(vocab, k + top_k_delta))
    keep_k = ranks < k
    keep = keep_k.copy()
    if top_p < 1.0:
        q = p.copy() if top_p_before_top_k else np.where(keep_k, p, 0.0)
        q /= q.sum()
        incl = np.cumsum(q)
        before = incl - q
        if check_margin:
            active = q > 0
            assert np.all(np.abs(before[active] - top_p) > MARGIN), "top-p cut too close"
        keep_p = incl <= top_p if top_p_inclusive else before < top_p
        keep_p[0] = True
        if top_p_one_extra:
            keep_p[min(vocab - 1, int(keep_p.sum()))] = True
        keep &= keep_p
    if min_p > 0.0:
        thr = min_p if min_p_absolute else min_p * p[0]
        if check_margin:
            assert np.all(np.abs(p - thr) > MARGIN * p[0]), "min-p cut too close"
        keep &= p >= thr
    w = np.where(keep, p, 0.0)
    with np.errstate(invalid="ignore"):  # a mutation may keep nothing: NaN, callers check
        out[order] = w / w.sum()
    return out


def gof_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness-of-fit p-value of ``counts`` against ``probs``.

    A draw where ``probs`` is zero is an impossible event: p-value 0. Bins whose expected count
    is below 5 are pooled (and the pool merged into the smallest bin if still below 5)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts[probs == 0].sum() > 0:
        return 0.0
    n = counts.sum()
    support = probs > 0
    exp = n * probs[support]
    obs = counts[support]
    small = exp < 5
    if small.any():
        pooled_e, pooled_o = exp[small].sum(), obs[small].sum()
        exp, obs = exp[~small], obs[~small]
        if pooled_e >= 5 or len(exp) == 0:
            exp, obs = np.append(exp, pooled_e), np.append(obs, pooled_o)
        else:
            j = int(np.argmin(exp))
            exp[j] += pooled_e
            obs[j] += pooled_o
    if len(exp) < 2:
        return 1.0  # a single bin: nothing to test beyond the support check
    exp *= obs.sum() / exp.sum()  # float rounding of the reference
    return float(chisquare(obs, exp).pvalue)


def logits_from_probs(head: list[float], vocab: int, perm_seed: int) -> np.ndarray:
    """float32 logits whose softmax puts ``head`` (decreasing) on permuted ids and spreads the
    remaining mass evenly over the rest of the vocabulary."""
    head_a = np.array(head, dtype=np.float64)
    rest = np.full(vocab - len(head_a), (1.0 - head_a.sum()) / (vocab - len(head_a)))
    p = np.concatenate([head_a, rest])
    perm = np.random.default_rng(perm_seed).permutation(vocab)
    out = np.empty(vocab, dtype=np.float32)
    out[perm] = np.log(p).astype(np.float32)
    return out


# ---- the reference itself --------------------------------------------------------------------


def test_reference_hand_computed():
    logits = np.log(np.array([0.1, 0.4, 0.3, 0.2]))
    np.testing.assert_allclose(filtered_probs(logits, top_k=2), [0, 4 / 7, 3 / 7, 0])
    # top-p 0.5: mass before rank 1 (id 2) is 0.4 < 0.5 -> kept; before rank 2 is 0.7 -> cut
    np.testing.assert_allclose(filtered_probs(logits, top_p=0.5), [0, 4 / 7, 3 / 7, 0])
    np.testing.assert_allclose(filtered_probs(logits, min_p=0.6), [0, 4 / 7, 3 / 7, 0])
    np.testing.assert_allclose(filtered_probs(logits, temperature=0), [0, 1, 0, 0])
    # ties: ids 0 and 3 tie; top_k=2 keeps id 1 and the lower tied id 0
    tied = np.log(np.array([0.25, 0.5, 0.0001, 0.25]))
    assert np.flatnonzero(filtered_probs(tied, top_k=2)).tolist() == [0, 1]


def test_reference_processing_hand_computed():
    x = process_logits(
        [2.0, -2.0, 1.0, 0.5, 3.0],
        prompt=[0],
        output=[1, 2, 2],
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={3: 1.0},
        bad=[4],
    )
    np.testing.assert_allclose(x, [1.0, -4.0 - 0.25 - 0.5, 0.5 - 0.5 - 0.5, 1.5, -np.inf])


def test_gof_rejects_impossible_draws():
    assert gof_pvalue(np.array([5, 1]), np.array([1.0, 0.0])) == 0.0
    assert gof_pvalue(np.array([500, 500]), np.array([0.5, 0.5])) == pytest.approx(1.0)
