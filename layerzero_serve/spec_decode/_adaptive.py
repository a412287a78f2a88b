"""Adaptive number of drafts: choose ``k`` (0 = speculation off) each step from the batch size
and the measured acceptance rate.

**Model.** With per-token acceptance rate ``a`` (each draft accepted independently until the
first rejection) a step with ``k`` drafts emits on average ``(1 - a^(k+1)) / (1 - a)`` tokens
(``k + 1`` when ``a = 1``). It costs ``k`` draft steps of relative cost ``c`` (``c ~ 0`` for
n-gram lookup) and one target pass over ``B (k + 1)`` query tokens instead of ``B``. Relative to
plain decoding the expected tokens per unit time are::

    S(k) = (1 - a^(k+1)) / ((1 - a) * (k c + T(B (k+1)) / T(B)))

where ``T(n)`` is the target step time for ``n`` query tokens. With a flat ``T`` (small batches,
memory-bound decode) this is ``(1 - a^(k+1)) / ((1 - a)(k c + 1))``. ``S(0) = 1``; the chosen
``k`` maximises ``S`` and is 0 unless some ``k`` beats plain decoding by more than ``min_gain``.

``T`` comes from a :class:`StepCostModel`: :class:`LinearStepCost` by default, or a
:class:`TableStepCost` of times the runner measured (e.g. per captured graph bucket).

**Acceptance estimate.** Per row and step, ``acc`` accepted drafts are ``acc`` successes and,
when ``acc < num_drafts``, one failure; the rate is successes / (successes + failures) (the
maximum-likelihood estimate for the model above) over exponentially decayed counts, started
from a prior of ``prior_weight`` pseudo-observations at ``initial_acceptance``. While ``k = 0``
nothing is measured, so after ``probe_interval`` steps off one step is a probe (``choose``
returns 1 and sets ``probing``); each probe that does not turn speculation back on doubles the
wait (up to 64 x ``probe_interval``), so a workload with nothing to accept pays a vanishing
share of probe steps. With ``min_evidence`` every step is a probe until that many (decayed)
draft outcomes have been observed, so the prior alone never turns speculation on. The engine's
coordinator runs probes as *shadow* drafts, scored against the tokens the plain step emits,
which costs the proposer's host time and no verification pass.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from layerzero_serve.errors import ValidationError
from layerzero_serve.spec_decode._proposer import MAX_K, check_int

MAX_BACKOFF = 64  # the longest wait between probes, in units of probe_interval

__all__ = [
    "AdaptiveK",
    "LinearStepCost",
    "StepCostModel",
    "TableStepCost",
    "expected_speedup",
    "expected_tokens",
]


def _check_float(name: str, value: object, low: float, high: float) -> None:
    """A real number in ``[low, high]`` (``high = inf``: finite and >= low)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and low <= value <= high and math.isfinite(value)):
        allowed = f"finite float >= {low}" if high == math.inf else f"float in [{low}, {high}]"
        raise ValidationError(name, value, allowed)


class StepCostModel(Protocol):
    def step_time(self, num_query_tokens: int) -> float:
        """Target forward time (any unit) for a step with ``num_query_tokens`` query tokens."""
        ...


@dataclass(frozen=True, slots=True)
class LinearStepCost:
    """``T(n) = fixed + per_token * n``. The default says a step costs the same up to a few
    hundred tokens (weight reads dominate) and grows linearly after: 1 + n / 256."""

    fixed: float = 1.0
    per_token: float = 1.0 / 256

    def __post_init__(self) -> None:
        _check_float("per_token", self.per_token, 0.0, math.inf)
        _check_float("fixed", self.fixed, 0.0, math.inf)
        if self.fixed == 0:
            raise ValidationError("fixed", self.fixed, "finite float > 0")

    def step_time(self, num_query_tokens: int) -> float:
        return self.fixed + self.per_token * num_query_tokens


class TableStepCost:
    """Measured step times, linearly interpolated; flat below the first point and extrapolated
    along the last segment's slope above the last one.

    Args:
        times: ``{num_query_tokens: step_time}`` with at least one point, tokens >= 1, times > 0.
    """

    def __init__(self, times: Mapping[int, float]) -> None:
        if not times:
            raise ValidationError("times", dict(times), "at least one (tokens, time) point")
        points = sorted((int(n), float(t)) for n, t in times.items())
        for n, t in points:
            if n < 1 or not (t > 0 and math.isfinite(t)):
                raise ValidationError("times", {n: t}, "tokens >= 1 and finite times > 0")
        self._tokens = [n for n, _ in points]
        self._times = [t for _, t in points]

    def step_time(self, num_query_tokens: int) -> float:
        xs, ys = self._tokens, self._times
        if num_query_tokens <= xs[0] or len(xs) == 1:
            return ys[0]
        i = min(bisect.bisect_left(xs, num_query_tokens), len(xs) - 1)  # segment (i-1, i)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        # A falling last segment must not extrapolate to a zero or negative time.
        return max(y0 + (y1 - y0) * (num_query_tokens - x0) / (x1 - x0), 1e-3 * ys[0])


def expected_tokens(a: float, k: int) -> float:
    """Expected tokens emitted by one step with ``k`` drafts at acceptance rate ``a``."""
    return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


def expected_speedup(
    a: float, k: int, batch_size: int, draft_cost: float, step_cost: StepCostModel
) -> float:
    """``S(k)``: expected tokens per unit time relative to plain decoding (module docstring)."""
    if k == 0:
        return 1.0
    verify = step_cost.step_time(batch_size * (k + 1)) / step_cost.step_time(batch_size)
    return expected_tokens(a, k) / (k * draft_cost + verify)


class AdaptiveK:
    """Chooses the number of drafts per step (see the module docstring).

    Args:
        k_max: largest ``k`` considered, in ``[1, MAX_K]``.
        draft_cost: cost of one draft step relative to one target step (``>= 0``; 0 for n-gram).
        step_cost: target step time model; default :class:`LinearStepCost`.
        decay: weight of the past per update, in ``[0, 1)`` (0.9: about the last 10 steps).
        initial_acceptance, prior_weight: the prior (rate in ``[0, 1]``, pseudo-tokens >= 0).
        min_gain: ``k > 0`` only when ``S(k) > 1 + min_gain`` (``>= 0``).
        probe_interval: steps with ``k = 0`` between probes with ``k = 1`` (0 = never probe).
        min_evidence: probe every step until this many decayed draft outcomes were observed
            (``>= 0``; 0 = trust the prior from the start).

    ``step_cost`` is a public attribute: the runner may replace it whenever it has measured
    step times (e.g. ``TableStepCost`` from its captured verification graphs).

    CUDA graphs: host only; it decides ``k`` between steps and is never captured.
    """

    def __init__(
        self,
        k_max: int,
        *,
        draft_cost: float = 0.0,
        step_cost: StepCostModel | None = None,
        decay: float = 0.9,
        initial_acceptance: float = 0.5,
        prior_weight: float = 4.0,
        min_gain: float = 0.0,
        probe_interval: int = 50,
        min_evidence: float = 0.0,
    ) -> None:
        self.k_max = check_int("k_max", k_max, 1, MAX_K)
        _check_float("draft_cost", draft_cost, 0.0, math.inf)
        _check_float("decay", decay, 0.0, 1.0)
        if decay >= 1.0:
            raise ValidationError("decay", decay, "float in [0, 1)")
        _check_float("initial_acceptance", initial_acceptance, 0.0, 1.0)
        _check_float("prior_weight", prior_weight, 0.0, math.inf)
        _check_float("min_gain", min_gain, 0.0, math.inf)
        _check_float("min_evidence", min_evidence, 0.0, math.inf)
        self.min_evidence = float(min_evidence)
        self._evidence = 0.0  # decayed count of observed draft outcomes (the prior excluded)
        self.probing = False  # the last choose() returned a probe
        self.probe_interval = check_int("probe_interval", probe_interval, 0, 1 << 30)
        self.draft_cost = float(draft_cost)
        self.step_cost: StepCostModel = step_cost or LinearStepCost()
        self.decay = float(decay)
        self.min_gain = float(min_gain)
        self._accepted = initial_acceptance * prior_weight  # decayed successes
        self._rejected = (1.0 - initial_acceptance) * prior_weight  # decayed failures
        self._steps_off = 0
        self._interval = self.probe_interval  # grows while probes keep failing

    @property
    def acceptance_rate(self) -> float:
        """Current estimate of the per-token acceptance rate (0.5 with no data at all)."""
        total = self._accepted + self._rejected
        return self._accepted / total if total > 0 else 0.5

    def update(
        self, num_drafts: Sequence[int] | np.ndarray, num_accepted: Sequence[int] | np.ndarray
    ) -> None:
        """Fold one verification step in: ``[B]`` drafts and accepted drafts per row."""
        drafts = np.asarray(num_drafts, dtype=np.int64).reshape(-1)
        accepted = np.asarray(num_accepted, dtype=np.int64).reshape(-1)
        if accepted.shape != drafts.shape:
            raise ValidationError("num_accepted", accepted.shape, f"shape {drafts.shape}")
        if drafts.size and (accepted.min() < 0 or (accepted > drafts).any()):
            raise ValidationError("num_accepted", accepted.tolist(), "ints in [0, num_drafts]")
        if not drafts.any():
            return  # no drafts, no evidence: keep the estimate (do not decay it away)
        self._accepted = self.decay * self._accepted + float(accepted.sum())
        self._rejected = self.decay * self._rejected + float(np.count_nonzero(accepted < drafts))
        self._evidence = self.decay * self._evidence + float(np.count_nonzero(drafts))

    def best_k(self, batch_size: int, acceptance: float | None = None) -> tuple[int, float]:
        """``(k, S(k))`` maximising the expected speedup (k = 0 and 1.0 when none beats plain
        decoding by more than ``min_gain``; ties go to the smaller k). No probing, no state."""
        batch_size = check_int("batch_size", batch_size, 0, 1 << 30)
        a = self.acceptance_rate if acceptance is None else acceptance
        best, best_s = 0, 1.0
        if batch_size == 0:
            return best, best_s
        for k in range(1, self.k_max + 1):
            s = expected_speedup(a, k, batch_size, self.draft_cost, self.step_cost)
            if s > best_s and s > 1.0 + self.min_gain:
                best, best_s = k, s
        return best, best_s

    def choose(self, batch_size: int) -> int:
        """The ``k`` for this step (``0..k_max``; 0 = decode without drafts), probing with
        ``k = 1`` (and ``probing`` set) after ``probe_interval`` consecutive steps off, or on
        every step while fewer than ``min_evidence`` outcomes were observed."""
        self.probing = False
        if batch_size and self._evidence < self.min_evidence:
            self.probing = True
            return 1
        k, _ = self.best_k(batch_size)
        if k > 0 or batch_size == 0:
            self._steps_off = 0
            self._interval = self.probe_interval
            return k
        self._steps_off += 1
        if self.probe_interval and self._steps_off > self._interval:
            self._steps_off = 0
            # unless this probe turns speculation back on, wait twice as long for the next
            self._interval = min(2 * self._interval, MAX_BACKOFF * self.probe_interval)
            self.probing = True
            return 1
        return 0
