"""Speculative sampling is lossless: the emitted tokens follow the target law exactly.

* Single position: 50 (p, q) pairs over a 32-token vocabulary (q = p, disjoint supports, one-hot
  p or q, sparse and peaked pairs); per pair the first emitted token is chi-square tested against
  p (Bonferroni over the pairs; tokens with p = 0 must never appear) and the acceptance rate must
  lie within 4 sigma of sum(min(p, q)).
* Joint: Markov-chain target and draft (8 tokens, k = 3, drafts per row varying 0..3 with
  garbage in the padding): the law of the first 4 emitted tokens equals the exact chain law.
* Power: the same checks fail for two broken samplers (resampling from p; ratio q/p).

Trials per pair / sequences: ``LZ_SPEC_TRIALS`` (CPU default below; the GPU tests use 10^6 and
import the helpers of this module).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from layerzero_serve.spec_decode._rejection import draw_randoms, rejection_sample

TRIALS = int(os.environ.get("LZ_SPEC_TRIALS", "40000"))
JOINT_SEQS = 5 * TRIALS  # sequences are cheaper than pairs (8 tokens, 4 steps at most)
VOCAB = 32
NUM_PAIRS = 50
ALPHA = 1e-3  # family-wise: each of the NUM_PAIRS tests runs at ALPHA / NUM_PAIRS
MARKOV_VOCAB, MARKOV_K, JOINT_LEN = 8, 3, 4


# ---- (p, q) pairs --------------------------------------------------------------------------


def _dirichlet(rng, alpha, zeros=0.0):
    x = rng.dirichlet(np.full(VOCAB, alpha))
    if zeros:
        x[rng.random(VOCAB) < zeros] = 0.0
        if x.sum() == 0:
            x[rng.integers(VOCAB)] = 1.0
    return x / x.sum()


def _one_hot(i):
    x = np.zeros(VOCAB)
    x[i] = 1.0
    return x


def make_pairs(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """NUM_PAIRS ``(p, q, q_is_one_hot_input)`` float64 pairs; the flag asks to pass
    ``draft_probs=None`` (one-hot q implied by the draft id) instead of q itself."""
    rng = np.random.default_rng(seed)
    pairs = []
    p = _dirichlet(rng, 1.0)
    pairs.append((p, p.copy(), False))  # q = p: every draft accepted
    half = np.arange(VOCAB) < VOCAB // 2
    for _ in range(2):  # disjoint supports: never accepted, always resampled from p
        a, b = _dirichlet(rng, 1.0) * half, _dirichlet(rng, 1.0) * ~half
        pairs.append((a / a.sum(), b / b.sum(), False))
    pairs.append((_one_hot(3), _dirichlet(rng, 1.0), False))  # one-hot p
    pairs.append((_one_hot(5), _one_hot(5), True))  # one-hot both, same token
    pairs.append((_one_hot(5), _one_hot(9), True))  # one-hot both, different tokens
    for i in range(4):  # one-hot q (n-gram / greedy drafts), explicit and implied
        pairs.append((_dirichlet(rng, 0.5), _one_hot(int(rng.integers(VOCAB))), i % 2 == 0))
    while len(pairs) < NUM_PAIRS:
        alpha = [0.1, 0.3, 1.0, 3.0][len(pairs) % 4]
        p = _dirichlet(rng, alpha, zeros=0.2 * (len(pairs) % 3 == 0))
        q = _dirichlet(rng, alpha, zeros=0.3 * (len(pairs) % 2 == 0))
        if len(pairs) % 5 == 0:
            q = 0.7 * p + 0.3 * q  # close draft: high acceptance
        pairs.append((p, q, False))
    return pairs


# ---- statistics ----------------------------------------------------------------------------


def chisquare_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of ``counts`` against ``probs``; 0.0 if a zero-probability cell has counts.
    Cells with expected count < 5 are pooled (the pool joins the smallest cell if still < 5)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64).reshape(-1)
    if counts[probs == 0].any():
        return 0.0
    expected = probs / probs.sum() * counts.sum()
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    pool_obs, pool_exp = counts[~big & (probs > 0)].sum(), expected[~big & (probs > 0)].sum()
    if pool_exp > 0:
        if pool_exp < 5 and exp:
            j = int(np.argmin(exp))
            obs[j] += pool_obs
            exp[j] += pool_exp
        else:
            obs.append(pool_obs)
            exp.append(pool_exp)
    if len(exp) < 2:
        return 1.0  # a single cell holds everything: nothing to test beyond the zero cells
    return float(chisquare(obs, exp).pvalue)


def single_position_draws(sampler, p, q, implied, trials, device, seed):
    """``trials`` independent verifications of one draft (k = 1): first emitted token, accepted."""
    gen = torch.Generator(device=device).manual_seed(seed)
    p_t = torch.tensor(p, dtype=torch.float32, device=device)
    q_t = torch.tensor(q, dtype=torch.float32, device=device)
    draft = torch.multinomial(q_t, trials, replacement=True, generator=gen)[:, None]
    target = p_t.expand(trials, 2, VOCAB)
    draft_probs = None if implied else q_t.expand(trials, 1, VOCAB)
    uniforms, noise = draw_randoms(trials, 1, VOCAB, generator=gen, device=device)
    num_drafts = torch.ones(trials, dtype=torch.int32, device=device)
    out, acc = sampler(draft, draft_probs, target, uniforms, noise, num_drafts)
    return out[:, 0].cpu().numpy(), acc.cpu().numpy()


def single_position_failures(
    sampler, trials=TRIALS, device="cpu", seed=0, stop_after=NUM_PAIRS
) -> list[str]:
    """The pairs whose emitted-token law or acceptance rate disagrees with the theory (the
    first ``stop_after`` of them: enough to show a broken sampler fails)."""
    failures = []
    pairs = make_pairs(seed)
    for i, (p, q, implied) in enumerate(pairs):
        if len(failures) >= stop_after:
            break
        tokens, acc = single_position_draws(sampler, p, q, implied, trials, device, seed + i)
        reasons = []
        pval = chisquare_pvalue(np.bincount(tokens, minlength=VOCAB), p)
        if pval < ALPHA / len(pairs):
            reasons.append(f"emitted law p-value {pval:.2e}")
        alpha = float(np.minimum(p, q).sum())
        sigma = (alpha * (1 - alpha) / trials) ** 0.5
        if abs(acc.mean() - alpha) > 4 * sigma + 1e-6:
            reasons.append(f"acceptance {acc.mean():.4f} vs {alpha:.4f}")
        if reasons:
            failures.append(f"pair {i}: " + "; ".join(reasons))
    return failures


# ---- joint law over a Markov chain ------------------------------------------------------------


def markov_chains(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Target P and draft Q transition matrices [8, 8] (rows sum to 1, P has zeros)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(MARKOV_VOCAB, 0.7), size=MARKOV_VOCAB)
    p[rng.random(p.shape) < 0.2] = 0.0
    p[np.arange(MARKOV_VOCAB), rng.integers(MARKOV_VOCAB, size=MARKOV_VOCAB)] += 0.05
    q = 0.6 * p + 0.4 * rng.dirichlet(np.full(MARKOV_VOCAB, 1.0), size=MARKOV_VOCAB)
    return p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)


def joint_draws(sampler, num_seqs, device="cpu", seed=0, greedy_draft=False) -> np.ndarray:
    """First JOINT_LEN tokens of ``num_seqs`` sequences from state 0, speculating with k = 3
    (each row and step drafts a random 0..3 tokens; padding holds garbage ids, out-of-vocabulary
    ones included, and garbage distributions).
    ``greedy_draft``: drafts are the draft chain's argmax and ``draft_probs=None``."""
    pm, qm = markov_chains()
    gen = torch.Generator(device=device).manual_seed(seed)
    P = torch.tensor(pm, dtype=torch.float32, device=device)
    Q = torch.tensor(qm, dtype=torch.float32, device=device)
    n, k, v = num_seqs, MARKOV_K, MARKOV_VOCAB
    rows = torch.arange(n, device=device)
    emitted = torch.full((n, JOINT_LEN), -1, dtype=torch.long, device=device)
    count = torch.zeros(n, dtype=torch.long, device=device)
    last = torch.zeros(n, dtype=torch.long, device=device)
    while bool((count < JOINT_LEN).any()):
        num_drafts = torch.randint(0, k + 1, (n,), generator=gen, device=device).int()
        real = torch.arange(k, device=device) < num_drafts[:, None]
        drafts = torch.randint(-3, v + 3, (n, k), generator=gen, device=device)  # garbage
        garbage = torch.rand(n, k + 1, v, generator=gen, device=device)
        garbage = garbage / garbage.sum(-1, keepdim=True)
        target, draft_probs = garbage.clone(), garbage[:, :k].clone()
        prev = last
        for j in range(k + 1):
            live = j <= num_drafts  # position j is the bonus position when j == num_drafts
            target[:, j] = torch.where(live[:, None], P[prev], target[:, j])
            if j == k:
                break
            if greedy_draft:
                x = Q[prev].argmax(-1)
            else:
                x = torch.multinomial(Q[prev], 1, generator=gen)[:, 0]
            draft_probs[:, j] = torch.where(real[:, j, None], Q[prev], draft_probs[:, j])
            drafts[:, j] = torch.where(real[:, j], x, drafts[:, j])
            prev = torch.where(real[:, j], x, prev)
        uniforms, noise = draw_randoms(n, k, v, generator=gen, device=device)
        out, _ = sampler(
            drafts, None if greedy_draft else draft_probs, target, uniforms, noise, num_drafts
        )
        for j in range(k + 1):
            take = (out[:, j] >= 0) & (count < JOINT_LEN)
            emitted[rows[take], count[take]] = out[take, j]
            count += take.long()
        last = emitted.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]
    return emitted.cpu().numpy()


def joint_pvalue(emitted: np.ndarray) -> float:
    """Chi-square p-value of the emitted sequences against the exact chain law from state 0."""
    pm, _ = markov_chains()
    law = pm[0]
    for _ in range(JOINT_LEN - 1):
        law = law[..., None] * pm  # P(t_1..t_j) * P(t_{j+1} | t_j), broadcast over t_1..t_{j-1}
    cells = np.ravel_multi_index(emitted.T, [MARKOV_VOCAB] * JOINT_LEN)
    counts = np.bincount(cells, minlength=MARKOV_VOCAB**JOINT_LEN)
    return chisquare_pvalue(counts, law.reshape(-1))


# ---- mutants (test-local: broken on purpose) ---------------------------------------------------


def mutant_sampler(kind: str):
    """A sampler with the reference's signature and one deliberate bug: ``"resample_p"`` draws
    the recovered token from p instead of max(p - q, 0); ``"inverted"`` accepts with q/p."""

    def run(draft_ids, draft_probs, target_probs, uniforms, noise, num_drafts, is_greedy=None):
        b, k = draft_ids.shape
        v = target_probs.shape[2]
        dev = draft_ids.device
        rows, pos = torch.arange(b, device=dev), torch.arange(k, device=dev)
        n = num_drafts.long().clamp(0, k)
        idx = draft_ids.clamp(0, v - 1)
        ok = (draft_ids >= 0) & (draft_ids < v) & (pos < n[:, None])
        p_x = target_probs[:, :k].gather(2, idx[..., None])[..., 0]
        if draft_probs is None:
            q_x = torch.ones_like(p_x)
            q_all = torch.nn.functional.one_hot(idx, v).float() * ok[..., None]
        else:
            q_x, q_all = draft_probs.gather(2, idx[..., None])[..., 0], draft_probs
        accept = uniforms * p_x < q_x if kind == "inverted" else uniforms * q_x < p_x
        a = (accept & ok).int().cumprod(1).sum(1).long()
        p_a = target_probs[rows, a]
        w = p_a
        if kind != "resample_p" and k:
            q_a = q_all[rows, a.clamp(max=k - 1)] * (a < n)[:, None]
            w = (p_a - q_a).clamp_min(0)
            w = torch.where(w.sum(1, keepdim=True) > 0, w, p_a)
        out = torch.full((b, k + 1), -1, dtype=torch.long, device=dev)
        out[:, :k] = torch.where(pos < a[:, None], draft_ids, -1)
        out[rows, a] = (w * noise).argmax(1)
        return out, a.int()

    return run


# ---- tests ---------------------------------------------------------------------------------------


def test_pairs_cover_the_corner_cases():
    pairs = make_pairs()
    assert len(pairs) == NUM_PAIRS
    overlaps = [float(np.minimum(p, q).sum()) for p, q, _ in pairs]
    assert overlaps[0] == pytest.approx(1.0) and min(overlaps) == 0.0
    assert any(implied for *_, implied in pairs)
    assert all(abs(p.sum() - 1) < 1e-12 and abs(q.sum() - 1) < 1e-12 for p, q, _ in pairs)


def test_single_position_is_lossless():
    assert single_position_failures(rejection_sample) == []


@pytest.mark.parametrize("kind", ["resample_p", "inverted"])
def test_single_position_check_catches_mutants(kind):
    assert len(single_position_failures(mutant_sampler(kind), stop_after=3)) == 3


@pytest.mark.parametrize("greedy_draft", [False, True])
def test_joint_law_of_four_tokens_is_lossless(greedy_draft):
    emitted = joint_draws(rejection_sample, JOINT_SEQS, greedy_draft=greedy_draft)
    assert (emitted >= 0).all()
    assert joint_pvalue(emitted) > ALPHA


@pytest.mark.parametrize("kind", ["resample_p", "inverted"])
def test_joint_check_catches_mutants(kind):
    emitted = joint_draws(mutant_sampler(kind), JOINT_SEQS)
    assert joint_pvalue(emitted) < ALPHA
