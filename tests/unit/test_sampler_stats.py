"""Statistical and reproducibility tests of the reference Sampler.

Every sampled distribution is checked against a reference computed here, independently of the
sampler, in float64 NumPy: rank tokens by descending logit (lower id first on ties), scale by the
temperature, softmax, keep the top-k prefix, keep the top-p prefix of the distribution
renormalised after top-k (token j kept iff the mass before it is < top_p), keep tokens with
p >= min_p * p_max, renormalise.

Goodness of fit: 10^5 draws per case, chi-square (scipy.stats.chisquare) with the significance
level 1e-3 split (Bonferroni) over the cases. Draws outside the reference support must be zero.
Mutation sanity: for several plausible bugs (top-p keeping one token too few or too many, top-k
off by one, top-p applied before top-k, absolute min-p, temperature ignored) the same draws are
shown to reject the mutated distribution, so these tests have the power to catch such bugs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import Sampler, SamplingParams

V = 32
N_DRAWS = 100_000
ALPHA = 1e-3
MARGIN = 1e-4  # reference refuses cases whose top-p / min-p cut is closer than this


# ---- independent float64 reference -----------------------------------------------------------


def reference_probs(
    logits,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    *,
    top_p_inclusive=False,  # mutation: keep j iff mass up to and including j <= top_p
    top_p_one_extra=False,  # mutation: keep one token more than the correct top-p set
    top_k_delta=0,  # mutation: top-k off by this many
    top_p_before_top_k=False,  # mutation: top-p on the full (not top-k renormalised) dist
    min_p_absolute=False,  # mutation: keep p >= min_p instead of p >= min_p * p_max
    check_margin=True,
) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    vocab = x.shape[0]
    out = np.zeros(vocab)
    if temperature == 0 or top_k == 1:
        out[int(np.argmax(x))] = 1.0  # np.argmax: first (lowest) index among ties
        return out
    # descending logit, then ascending token id
    order = np.array(sorted(range(vocab), key=lambda i: (-x[i], i)))
    z = x[order] / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
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
        active = q > 0
        if check_margin:
            assert np.all(np.abs(before[active] - top_p) > MARGIN), "top-p cut too close"
        if top_p_inclusive:
            keep_p = incl <= top_p
            keep_p[0] = True
        else:
            keep_p = before < top_p
        if top_p_one_extra:
            keep_p[min(vocab - 1, int(keep_p.sum()))] = True
        keep &= keep_p
    if min_p > 0.0:
        thr = min_p if min_p_absolute else min_p * p[0]
        if check_margin:
            assert np.all(np.abs(p - thr) > MARGIN * p[0]), "min-p cut too close"
        keep &= p >= thr
    w = np.where(keep, p, 0.0)
    w /= w.sum()
    out[order] = w
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
    return float(chisquare(obs, exp).pvalue)


# ---- cases -----------------------------------------------------------------------------------


def _random_logits(seed: int, scale: float = 1.5) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, V).astype(np.float32)


def _logits_from_probs(probs: list[float], perm_seed: int) -> np.ndarray:
    """Logits whose softmax puts ``probs`` (the head, decreasing) on permuted token ids and
    spreads the remaining mass evenly over the rest of the vocabulary."""
    head = np.array(probs, dtype=np.float64)
    rest = np.full(V - len(head), (1.0 - head.sum()) / (V - len(head)))
    p = np.concatenate([head, rest])
    perm = np.random.default_rng(perm_seed).permutation(V)
    out = np.empty(V, dtype=np.float32)
    out[perm] = np.log(p).astype(np.float32)
    return out


BASE = _random_logits(1234)
# Nucleus boundary: ranked probs .30 .25 .20 .10 ... ; top_p=.7 keeps exactly three tokens and the
# third (mass before it .55) carries 27% of the renormalised mass.
BOUNDARY = _logits_from_probs([0.30, 0.25, 0.20, 0.10], perm_seed=7)
# Ties straddling the top-k cut: ids 2, 3, 4 tie; top_k=3 keeps 0, 2, 3 (lower ids win).
TIES = np.full(V, -2.0, dtype=np.float32)
TIES[[0, 2, 3, 4]] = [3.0, 2.0, 2.0, 2.0]
TIES[1] = 1.0

CASES: dict[str, tuple[np.ndarray, dict]] = {
    "temperature_1": (BASE, {}),
    "temperature_0.6": (BASE, {"temperature": 0.6}),
    "temperature_2.5": (BASE, {"temperature": 2.5}),
    "top_k_5": (BASE, {"top_k": 5}),
    "top_k_1000_clamps": (BASE, {"top_k": 1000, "temperature": 1.3}),
    "top_p_0.8": (BASE, {"top_p": 0.8}),
    "top_p_boundary": (BOUNDARY, {"top_p": 0.7}),
    "min_p_0.1": (BASE, {"min_p": 0.1}),
    "top_k_ties": (TIES, {"top_k": 3}),
    "combo_t0.8_k10_p0.9": (BASE, {"temperature": 0.8, "top_k": 10, "top_p": 0.9}),
    "combo_t1.5_p0.95_minp0.05": (BASE, {"temperature": 1.5, "top_p": 0.95, "min_p": 0.05}),
    "combo_all": (BASE, {"temperature": 1.2, "top_k": 12, "top_p": 0.85, "min_p": 0.08}),
}
CASE_NAMES = list(CASES)
ALPHA_PER_CASE = ALPHA / len(CASES)

# (case, mutated reference kwargs): the correct draws must reject each mutated distribution.
MUTATIONS = [
    ("top_p_boundary", {"top_p_inclusive": True}),  # one token too few
    ("top_p_boundary", {"top_p_one_extra": True}),  # one token too many
    ("top_p_0.8", {"top_p_inclusive": True}),
    ("top_k_5", {"top_k_delta": -1}),
    ("top_k_5", {"top_k_delta": +1}),
    ("combo_t0.8_k10_p0.9", {"top_p_before_top_k": True}),
    ("min_p_0.1", {"min_p_absolute": True}),
    ("temperature_0.6", {"temperature": 1.0}),
]


@pytest.fixture(scope="module")
def draws() -> dict[str, np.ndarray]:
    """10^5 draws per case, from shuffled mixed batches (every call holds rows of every case,
    so the vectorised per-row parameters are exercised too). Returns counts per case."""
    sampler = Sampler(seed=20240611)
    rng = np.random.default_rng(99)
    logits_table = torch.from_numpy(np.stack([CASES[c][0] for c in CASE_NAMES]))
    params_table = [SamplingParams(**CASES[c][1]) for c in CASE_NAMES]
    chunks = 10
    per_chunk = N_DRAWS // chunks
    counts = np.zeros((len(CASES), V), dtype=np.int64)
    for _ in range(chunks):
        case_of_row = rng.permutation(np.repeat(np.arange(len(CASES)), per_chunk))
        logits = logits_table[torch.from_numpy(case_of_row)]
        params = [params_table[c] for c in case_of_row]
        tokens = sampler(logits, params, None)
        assert tokens.dtype == torch.long and tokens.shape == (len(case_of_row),)
        np.add.at(counts, (case_of_row, tokens.numpy()), 1)
    return {c: counts[i] for i, c in enumerate(CASE_NAMES)}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_goodness_of_fit(case, draws):
    logits, kw = CASES[case]
    ref = reference_probs(logits, **kw)
    counts = draws[case]
    assert counts.sum() == N_DRAWS
    outside = counts[ref == 0].sum()
    assert outside == 0, f"{outside} draws outside the support {np.flatnonzero(ref)}"
    p = gof_pvalue(counts, ref)
    assert p > ALPHA_PER_CASE, f"chi-square p={p:.3g} <= {ALPHA_PER_CASE:.3g}"


@pytest.mark.parametrize(("case", "mutation"), MUTATIONS, ids=[f"{c}-{m}" for c, m in MUTATIONS])
def test_goodness_of_fit_rejects_mutations(case, mutation, draws):
    logits, kw = CASES[case]
    right = reference_probs(logits, **kw)
    wrong = reference_probs(logits, **{**kw, **mutation}, check_margin=False)
    assert not np.allclose(right, wrong, atol=1e-3), "mutation does not change this case"
    assert gof_pvalue(draws[case], wrong) < ALPHA_PER_CASE


def test_boundary_cases_are_meaningful(draws):
    # top-p boundary: the third token is kept and carries a big share of the draws
    ref = reference_probs(*CASES["top_p_boundary"][0:1], **CASES["top_p_boundary"][1])
    assert np.count_nonzero(ref) == 3
    boundary_token = int(np.argsort(-ref, kind="stable")[2])
    assert ref[boundary_token] == pytest.approx(0.20 / 0.75)
    assert draws["top_p_boundary"][boundary_token] > 0.25 * N_DRAWS
    # top-k ties: ids 0, 2, 3 kept; 4 (tied with 2 and 3) and 1 dropped
    assert set(np.flatnonzero(draws["top_k_ties"])) == {0, 2, 3}
    # top_k > vocab is no filtering
    np.testing.assert_allclose(
        reference_probs(BASE, temperature=1.3, top_k=1000),
        reference_probs(BASE, temperature=1.3),
    )


@pytest.mark.parametrize("case", CASE_NAMES)
def test_compute_probs_matches_reference(case):
    logits, kw = CASES[case]
    got = Sampler().compute_probs(torch.from_numpy(logits)[None], [SamplingParams(**kw)])
    assert got.dtype == torch.float32 and got.shape == (1, V)
    np.testing.assert_allclose(got[0].numpy(), reference_probs(logits, **kw), atol=2e-6)


def test_top_p_ties_lower_id_wins():
    logits = np.full(V, -5.0, dtype=np.float32)
    logits[[9, 3, 20, 7]] = 1.0  # four tied tokens, ~0.24 each
    params = SamplingParams(top_p=0.5)
    probs = Sampler().compute_probs(torch.from_numpy(logits)[None], [params])[0].numpy()
    # mass before ranks 0, 1, 2 (ids 3, 7, 9) < .5; id 20 is cut
    assert set(np.flatnonzero(probs)) == {3, 7, 9}
    np.testing.assert_allclose(probs, reference_probs(logits, top_p=0.5), atol=1e-6)


def test_top_k_larger_than_vocab_clamps():
    logits = torch.from_numpy(BASE)[None].repeat(4, 1)
    sampler = Sampler()
    ks = [0, -1, V, V + 1, 1000, 10**9]
    probs = [sampler.compute_probs(logits[:1], [SamplingParams(top_k=k)])[0] for k in ks]
    for p in probs[1:]:
        torch.testing.assert_close(p, probs[0])
    seqs = []
    for k in ks:
        g = Sampler.make_generator(5)
        seqs.append([int(sampler(logits[:1], [SamplingParams(top_k=k)], [g])) for _ in range(20)])
    assert all(s == seqs[0] for s in seqs)


# ---- greedy ----------------------------------------------------------------------------------


def test_greedy_is_argmax_lowest_id_on_ties():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, V)).astype(np.float32)
    logits[5, [4, 17, 30]] = 50.0  # tie: 4 wins
    logits[6, [31, 2]] = 50.0  # tie: 2 wins
    params = [
        SamplingParams(temperature=0.0, top_p=0.1, min_p=0.9)
        if i % 2
        else SamplingParams(top_k=1, temperature=3.0)
        for i in range(64)
    ]
    # interleave non-greedy rows to exercise the mixed path
    params[10] = params[11] = SamplingParams(temperature=0.7)
    sampler = Sampler(seed=0)
    t = torch.from_numpy(logits)
    tokens = sampler(t, params, None).numpy()
    expected = np.argmax(logits, axis=-1)
    greedy = [i for i in range(64) if i not in (10, 11)]
    np.testing.assert_array_equal(tokens[greedy], expected[greedy])
    assert tokens[5] == 4 and tokens[6] == 2
    # all-greedy fast path and compute_probs one-hot
    only = [params[i] for i in greedy]
    np.testing.assert_array_equal(sampler(t[greedy], only, None).numpy(), expected[greedy])
    probs = sampler.compute_probs(t[greedy], only).numpy()
    np.testing.assert_array_equal(probs, np.eye(V, dtype=np.float32)[expected[greedy]])


def test_greedy_draws_nothing_sampled_row_draws_one_uniform():
    logits = torch.from_numpy(BASE)[None]
    g = Sampler.make_generator(11)
    before = g.get_state()
    Sampler()(logits, [SamplingParams(temperature=0.0, seed=11)], [g])
    assert torch.equal(g.get_state(), before)
    Sampler()(logits, [SamplingParams(seed=11)], [g])
    ref = Sampler.make_generator(11)
    torch.rand(1, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_tiny_temperature_is_argmax():
    logits = torch.from_numpy(np.stack([BASE, BOUNDARY, _random_logits(5, 30.0)]))
    params = [SamplingParams(temperature=t) for t in (1e-30, 1e-6, 1e-3)]
    tokens = Sampler(seed=1)(logits, params, None)
    torch.testing.assert_close(tokens, logits.argmax(-1))
    probs = Sampler().compute_probs(logits, params)
    assert torch.isfinite(probs).all()


# ---- seeded reproducibility ------------------------------------------------------------------

TRACKED = [
    # (seed, params)
    (101, SamplingParams(seed=101)),
    (202, SamplingParams(seed=202, temperature=0.8, top_p=0.9)),
    (303, SamplingParams(seed=303, top_k=8)),
    (404, SamplingParams(seed=404, min_p=0.05, temperature=1.3)),
    (505, SamplingParams(seed=505, temperature=1.1, top_k=16, top_p=0.95, min_p=0.02)),
    (101, SamplingParams(seed=101, temperature=0.9)),  # same seed as #0, different params
    (606, SamplingParams(seed=606, temperature=0.0)),  # greedy, seeded
]
STEPS = 20


def _step_logits(req: int, step: int, prev: int) -> np.ndarray:
    """Deterministic 'model': logits depend on the request, the step and the previous token."""
    return np.random.default_rng([req, step, prev + 1]).normal(0.0, 1.0, V).astype(np.float32)


def _solo_sequences() -> list[list[int]]:
    out = []
    for r, (seed, params) in enumerate(TRACKED):
        gen, prev, seq = Sampler.make_generator(seed), -1, []
        for step in range(STEPS):
            logits = torch.from_numpy(_step_logits(r, step, prev))[None]
            prev = int(Sampler()(logits, [params], [gen])[0])
            seq.append(prev)
        out.append(seq)
    return out


def _random_filler(rng: np.random.Generator) -> tuple[np.ndarray, SamplingParams, object]:
    kind = rng.integers(4)
    logits = rng.normal(0.0, rng.uniform(0.5, 3.0), V).astype(np.float32)
    if kind == 0:
        return logits, SamplingParams(temperature=0.0), None
    params = SamplingParams(
        temperature=float(rng.uniform(0.3, 2.0)),
        top_k=int(rng.choice([0, -1, 1, 3, 40])),
        top_p=float(rng.choice([1.0, 0.5, 0.9])),
        min_p=float(rng.choice([0.0, 0.1])),
    )
    if kind == 1:  # another seeded request (throwaway generator)
        return logits, params, Sampler.make_generator(int(rng.integers(1 << 62)))
    return logits, params, None


def test_seeded_request_independent_of_batch_position_and_companions():
    solo = _solo_sequences()
    rng = np.random.default_rng(2025)
    batch_sizes = set()
    for _trial in range(6):
        gens = [Sampler.make_generator(seed) for seed, _ in TRACKED]
        prev = [-1] * len(TRACKED)
        seqs: list[list[int]] = [[] for _ in TRACKED]
        sampler = Sampler(seed=int(rng.integers(1 << 30)))
        for step in range(STEPS):
            # split the tracked requests into random groups, each a separate batch with fillers
            order = rng.permutation(len(TRACKED))
            cuts = sorted(rng.choice(np.arange(1, len(TRACKED)), rng.integers(0, 4), False))
            for group in np.split(order, cuts):
                size = int(rng.integers(len(group), 65)) if rng.random() < 0.8 else len(group)
                rows = [("t", int(r)) for r in group]
                rows += [("f", _random_filler(rng)) for _ in range(size - len(group))]
                rows = [rows[i] for i in rng.permutation(len(rows))]
                batch_sizes.add(len(rows))
                logits, params, generators = [], [], []
                for kind, item in rows:
                    if kind == "t":
                        logits.append(_step_logits(item, step, prev[item]))
                        params.append(TRACKED[item][1])
                        generators.append(gens[item])
                    else:
                        logits.append(item[0])
                        params.append(item[1])
                        generators.append(item[2])
                tokens = sampler(torch.from_numpy(np.stack(logits)), params, generators).tolist()
                for (kind, item), tok in zip(rows, tokens, strict=True):
                    if kind == "t":
                        prev[item] = tok
                        seqs[item].append(tok)
        assert seqs == solo
    assert 1 in batch_sizes and max(batch_sizes) > 32


def test_same_seed_same_tokens_within_one_batch_and_different_seeds_differ():
    logits = torch.from_numpy(_random_logits(8, 0.5))[None].repeat(6, 1)
    params = [SamplingParams(seed=s) for s in (7, 8, 7, 9, 8, 7)]
    gens = [Sampler.make_generator(p.seed) for p in params]
    sampler = Sampler(seed=0)
    seqs = np.array([sampler(logits, params, gens).tolist() for _ in range(STEPS)]).T
    assert (seqs[0] == seqs[2]).all() and (seqs[0] == seqs[5]).all()
    assert (seqs[1] == seqs[4]).all()
    assert not (seqs[0] == seqs[1]).all()
    assert not (seqs[0] == seqs[3]).all()
    assert not (seqs[1] == seqs[3]).all()


def test_unseeded_rows_follow_sampler_seed():
    logits = torch.from_numpy(BASE)[None].repeat(50, 1)
    params = [SamplingParams()] * 50
    a = Sampler(seed=3)(logits, params, None)
    b = Sampler(seed=3)(logits, params, [None] * 50)
    c = Sampler(seed=4)(logits, params, None)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- input validation ------------------------------------------------------------------------


def test_call_validation():
    sampler = Sampler()
    logits = torch.zeros(2, V)
    two = [SamplingParams(), SamplingParams()]
    with pytest.raises(ValidationError) as info:
        sampler(logits, two[:1], None)
    assert info.value.param == "params"
    with pytest.raises(ValidationError) as info:
        sampler(logits, two, [None])
    assert info.value.param == "generators"
    with pytest.raises(ValidationError) as info:
        sampler(torch.zeros(V), two[:1], None)
    assert info.value.param == "logits"
    with pytest.raises(ValidationError) as info:
        sampler(torch.zeros(2, V, dtype=torch.long), two, None)
    assert info.value.param == "logits"
    with pytest.raises(ValidationError) as info:
        Sampler(seed=2**63)
    assert info.value.param == "seed"
    empty = sampler(torch.zeros(0, V), [], [])
    assert empty.shape == (0,) and empty.dtype == torch.long
