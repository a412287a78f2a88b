"""Statistical tests of the Sampler (torch kernel) against the float64 reference.

Every sampled distribution is compared with ``filtered_probs`` (test_sampling_reference.py),
computed independently in float64 NumPy. Vocabularies 32 and 257; 10^5 draws per case, drawn
as a graph replay would: one ``prepare()`` of a batch holding every case's rows shuffled
together, then repeated ``sample()`` calls (each advances every row's device offset, so each
call draws fresh numbers). Goodness of fit: chi-square (scipy.stats.chisquare) with the
significance level 1e-3 split (Bonferroni) over all cases; draws outside the reference support
must be zero. Mutation sanity: for plausible bugs (top-p one token too few or too many, top-k off
by one, top-p before top-k, absolute min-p, temperature ignored) the same draws reject the
mutated distribution, so the tests have the power to catch them. Fixed seeds throughout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sampling_reference import filtered_probs, gof_pvalue, logits_from_probs

from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.sampling._rows import CallRow

N_DRAWS = 100_000
ALPHA = 1e-3
ROWS_PER_CASE = 1000  # rows of each case in the batch; N_DRAWS / ROWS_PER_CASE sample() calls


def _random_logits(vocab: int, seed: int, scale: float = 1.5) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, vocab).astype(np.float32)


def _ties(vocab: int) -> np.ndarray:
    # ids 2, 3, 4 tie below id 0; top_k=3 keeps 0, 2, 3 (lower ids win); id 1 lower still
    x = np.full(vocab, -2.0, dtype=np.float32)
    x[[0, 2, 3, 4]] = [3.0, 2.0, 2.0, 2.0]
    x[1] = 1.0
    return x


def _cases(vocab: int) -> dict[str, tuple[np.ndarray, dict]]:
    base = _random_logits(vocab, {32: 1234, 257: 1236}[vocab])  # seeds with no close cut
    # ranked probs .30 .25 .20 .10 ...: top_p=.7 keeps exactly three tokens; the third (mass
    # before it .55) carries 27% of the renormalised mass
    boundary = logits_from_probs([0.30, 0.25, 0.20, 0.10], vocab, perm_seed=7)
    return {
        "temperature_1": (base, {}),
        "temperature_0.6": (base, {"temperature": 0.6}),
        "temperature_2.5": (base, {"temperature": 2.5}),
        "min_p_0.1": (base, {"min_p": 0.1}),
        "top_k_5": (base, {"top_k": 5}),
        "top_k_1000_clamps": (base, {"top_k": 1000, "temperature": 1.3}),
        "top_p_0.8": (base, {"top_p": 0.8}),
        "top_p_boundary": (boundary, {"top_p": 0.7}),
        "top_k_ties": (_ties(vocab), {"top_k": 3}),
        "combo_t0.8_k10_p0.9": (base, {"temperature": 0.8, "top_k": 10, "top_p": 0.9}),
        "combo_t1.5_p0.95_minp0.05": (base, {"temperature": 1.5, "top_p": 0.95, "min_p": 0.05}),
        "combo_all": (base, {"temperature": 1.2, "top_k": 12, "top_p": 0.85, "min_p": 0.08}),
    }


VOCABS = (32, 257)
# Cases without top-k / top-p are drawn in a batch of their own (the sampler's sort-free path),
# and also in the mixed batch (the sort path) at V=32; at V=257 the mixed batch holds only the
# filtering cases (CPU sorts dominate the test time).
UNFILTERED = ("temperature_1", "temperature_0.6", "temperature_2.5", "min_p_0.1")
FILTERED = tuple(c for c in _cases(32) if c not in UNFILTERED)
MIXED = {32: tuple(_cases(32)), 257: FILTERED}
PARAMS = [(v, "mixed", c) for v in VOCABS for c in MIXED[v]]
PARAMS += [(v, "unfiltered", c) for v in VOCABS for c in UNFILTERED]
ALPHA_PER_CASE = ALPHA / len(PARAMS)

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


def _draw_counts(vocab: int, names: list[str], seed: int) -> dict[str, np.ndarray]:
    cases = _cases(vocab)
    rng = np.random.default_rng(seed)
    case_of_row = rng.permutation(np.repeat(np.arange(len(names)), ROWS_PER_CASE))
    logits = torch.from_numpy(np.stack([cases[n][0] for n in names]))[case_of_row]
    params = [SamplingParams(**cases[n][1]) for n in names]
    rows = [CallRow(i, params[c], [], []) for i, c in enumerate(case_of_row.tolist())]
    sampler = Sampler(seed=seed, max_num_seqs=len(rows))
    sampler.bind("cpu", vocab)
    batch = sampler.prepare(rows)
    counts = np.zeros((len(names), vocab), dtype=np.int64)
    for _ in range(N_DRAWS // ROWS_PER_CASE):
        out = sampler.sample(logits, batch)
        np.add.at(counts, (case_of_row, out.tokens.numpy()), 1)
        assert not out.flags.any()
    return {n: counts[i] for i, n in enumerate(names)}


@pytest.fixture(scope="module")
def draws() -> dict[tuple[int, str, str], np.ndarray]:
    """(vocab, path, case) -> counts; path "mixed" (all cases in one batch: sort path) or
    "unfiltered" (the cases without top-k/top-p alone: the sort-free path)."""
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: a 2-core VM's thread wake-ups cost more than they save
    try:
        for vocab in VOCABS:
            for name, c in _draw_counts(vocab, list(MIXED[vocab]), 20240611 + vocab).items():
                out[(vocab, "mixed", name)] = c
            for name, c in _draw_counts(vocab, list(UNFILTERED), 77 + vocab).items():
                out[(vocab, "unfiltered", name)] = c
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize(
    ("vocab", "path", "case"), PARAMS, ids=[f"{v}-{p}-{c}" for v, p, c in PARAMS]
)
def test_goodness_of_fit(vocab, path, case, draws):
    logits, kw = _cases(vocab)[case]
    ref = filtered_probs(logits, **kw)
    counts = draws[(vocab, path, case)]
    assert counts.sum() == N_DRAWS
    outside = counts[ref == 0].sum()
    assert outside == 0, f"{outside} draws outside the support {np.flatnonzero(ref)}"
    p = gof_pvalue(counts, ref)
    assert p > ALPHA_PER_CASE, f"chi-square p={p:.3g} <= {ALPHA_PER_CASE:.3g}"


@pytest.mark.parametrize(("case", "mutation"), MUTATIONS, ids=[f"{c}-{m}" for c, m in MUTATIONS])
@pytest.mark.parametrize("vocab", VOCABS)
def test_goodness_of_fit_rejects_mutations(vocab, case, mutation, draws):
    logits, kw = _cases(vocab)[case]
    right = filtered_probs(logits, **kw)
    wrong = filtered_probs(logits, **{**kw, **mutation}, check_margin=False)
    if not np.isfinite(wrong).all():
        pytest.skip("the mutation keeps no token for this vocabulary")
    assert not np.allclose(right, wrong, atol=1e-3), "mutation does not change this case"
    path = "mixed" if case in MIXED[vocab] else "unfiltered"
    assert gof_pvalue(draws[(vocab, path, case)], wrong) < ALPHA_PER_CASE


@pytest.mark.parametrize("vocab", VOCABS)
def test_boundary_cases_are_meaningful(vocab, draws):
    cases = _cases(vocab)
    ref = filtered_probs(*cases["top_p_boundary"][0:1], **cases["top_p_boundary"][1])
    assert np.count_nonzero(ref) == 3
    boundary_token = int(np.argsort(-ref, kind="stable")[2])
    assert ref[boundary_token] == pytest.approx(0.20 / 0.75)
    assert draws[(vocab, "mixed", "top_p_boundary")][boundary_token] > 0.25 * N_DRAWS
    # top-k ties: ids 0, 2, 3 kept; 4 (tied with 2 and 3) and 1 dropped
    assert set(np.flatnonzero(draws[(vocab, "mixed", "top_k_ties")])) == {0, 2, 3}
