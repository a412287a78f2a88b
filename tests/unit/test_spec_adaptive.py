"""Adaptive k: the expected-speedup model, its decisions over acceptance rates, draft costs and
batch sizes (measured or linear step costs), the acceptance estimate and probing."""

from __future__ import annotations

import math

import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.spec_decode._adaptive import (
    AdaptiveK,
    LinearStepCost,
    TableStepCost,
    expected_speedup,
    expected_tokens,
)

FLAT = LinearStepCost(per_token=0.0)


def brute_force_k(a, batch, k_max, c, step_time):
    """Independent oracle: sum the geometric series term by term and compare every k."""
    best, best_s = 0, 1.0
    for k in range(1, k_max + 1):
        tokens = sum(a**i for i in range(k + 1))
        s = tokens / (k * c + step_time(batch * (k + 1)) / step_time(batch))
        if s > best_s + 1e-12:
            best, best_s = k, s
    return best


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 3) == 4.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_flat_cost_matches_the_closed_form():
    for a in (0.3, 0.7, 0.95):
        for k in (1, 3, 6):
            for c in (0.0, 0.1):
                closed = (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1))
                assert expected_speedup(a, k, 8, c, FLAT) == pytest.approx(closed)


@pytest.mark.parametrize(
    "a,c,expect",
    [
        (0.0, 0.0, 0),  # nothing accepted: no k beats plain decoding (a tie is not a win)
        (0.9, 0.0, 8),  # free drafts, free verification: as many as allowed
        (0.8, 0.2, 4),  # S = 1.5, 1.74, 1.85, 1.87, 1.84, ...: the optimum is inside
        (0.3, 0.5, 0),  # S(1) = 1.3 / 1.5 < 1
    ],
)
def test_decisions_with_flat_verification(a, c, expect):
    ak = AdaptiveK(8, draft_cost=c, step_cost=FLAT)
    assert ak.best_k(4, acceptance=a)[0] == expect
    assert brute_force_k(a, 4, 8, c, FLAT.step_time) == expect


@pytest.mark.parametrize("batch,expect", [(1, 8), (256, 2), (512, 1), (1024, 0)])
def test_larger_batches_speculate_less(batch, expect):
    """Default linear cost 1 + n/256: verification gets expensive once the batch is big."""
    ak = AdaptiveK(8)
    assert ak.best_k(batch, acceptance=0.8)[0] == expect
    assert brute_force_k(0.8, batch, 8, 0.0, LinearStepCost().step_time) == expect


def test_measured_table():
    table = TableStepCost({1: 10.0, 64: 10.0, 128: 12.0, 512: 40.0})
    assert table.step_time(1) == table.step_time(0) == 10.0
    assert table.step_time(96) == pytest.approx(11.0)
    assert table.step_time(1024) == pytest.approx(40.0 + 28.0 / 384 * 512)  # last slope
    ak = AdaptiveK(4, step_cost=table)
    for batch in (1, 16, 32, 64, 100, 200):
        for a in (0.2, 0.6, 0.9):
            expect = brute_force_k(a, batch, 4, 0.0, table.step_time)
            assert ak.best_k(batch, acceptance=a)[0] == expect
    assert ak.best_k(16, acceptance=0.6)[0] == 4  # 80 tokens cost 1.05 steps: S = 2.20 > 2.18
    assert ak.best_k(256, acceptance=0.6)[0] == 0  # 512 tokens cost 3.3 steps
    assert TableStepCost({8: 2.0}).step_time(100) == 2.0


def test_min_gain_and_empty_batch():
    ak = AdaptiveK(4, step_cost=FLAT, min_gain=0.5)
    assert ak.best_k(8, acceptance=0.3) == (0, 1.0)  # best S = 1.42 < 1.5
    assert ak.best_k(8, acceptance=0.6)[0] == 4
    assert ak.best_k(0, acceptance=0.9) == (0, 1.0)


def test_acceptance_estimate_and_decay():
    ak = AdaptiveK(4, prior_weight=0.0, decay=0.5)
    ak.update([4, 4, 0], [4, 1, 0])  # 5 accepted, 1 rejection (the all-accepted row has none)
    assert ak.acceptance_rate == pytest.approx(5 / 6)
    ak.update([2], [0])  # decayed: 2.5 / (2.5 + 0.5 + 1)
    assert ak.acceptance_rate == pytest.approx(2.5 / 4)
    ak.update([0, 0], [0, 0])  # no drafts: no evidence, no decay
    assert ak.acceptance_rate == pytest.approx(2.5 / 4)
    assert AdaptiveK(4, initial_acceptance=0.7).acceptance_rate == pytest.approx(0.7)


def test_choose_follows_the_measured_rate_and_probes_when_off():
    ak = AdaptiveK(4, step_cost=FLAT, draft_cost=0.3, probe_interval=3, decay=0.5)
    for _ in range(10):
        ak.update([4] * 8, [4] * 8)
    assert ak.choose(8) == 4
    for _ in range(10):
        ak.update([4] * 8, [0] * 8)
    assert ak.acceptance_rate < 0.01
    # probes after 3, then 6, then 12 steps off: failing probes back off exponentially
    got = [ak.choose(8) for _ in range(3 + 1 + 6 + 1 + 12 + 1)]
    assert [i for i, k in enumerate(got) if k] == [3, 10, 23]
    for _ in range(10):  # acceptance recovers: speculation back on, the probe wait resets
        ak.update([4] * 8, [4] * 8)
    assert ak.choose(8) == 4
    for _ in range(10):
        ak.update([4] * 8, [0] * 8)
    assert [ak.choose(8) for _ in range(4)] == [0, 0, 0, 1]
    assert [AdaptiveK(4, step_cost=FLAT, probe_interval=0).choose(8) for _ in range(3)] == [4] * 3


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(k_max=0), "k_max"),
        (dict(k_max=65), "k_max"),
        (dict(k_max=4, draft_cost=-0.1), "draft_cost"),
        (dict(k_max=4, draft_cost=math.inf), "draft_cost"),
        (dict(k_max=4, decay=1.0), "decay"),
        (dict(k_max=4, initial_acceptance=1.5), "initial_acceptance"),
        (dict(k_max=4, prior_weight="x"), "prior_weight"),
        (dict(k_max=4, min_gain=-1), "min_gain"),
        (dict(k_max=4, probe_interval=-1), "probe_interval"),
    ],
)
def test_validation(kwargs, param):
    with pytest.raises(ValidationError) as e:
        AdaptiveK(**kwargs)
    assert e.value.param == param


def test_validation_of_models_and_updates():
    with pytest.raises(ValidationError, match="per_token"):
        LinearStepCost(per_token=-1.0)
    with pytest.raises(ValidationError, match="fixed"):
        LinearStepCost(fixed=0.0)
    with pytest.raises(ValidationError, match="times"):
        TableStepCost({})
    with pytest.raises(ValidationError, match="times"):
        TableStepCost({0: 1.0})
    ak = AdaptiveK(4)
    with pytest.raises(ValidationError, match="num_accepted"):
        ak.update([2, 2], [3, 0])
    with pytest.raises(ValidationError, match="batch_size"):
        ak.choose(-1)
