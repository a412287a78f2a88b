"""Adaptive speculation pauses a proposer that drafts nothing (1, 2, 4, ... up to 64 steps), so
n-gram lookup on text with nothing to copy stops costing host time every step, and resumes
asking every step once it drafts again. Non-adaptive speculation always asks."""

from __future__ import annotations

from types import SimpleNamespace

from layerzero_serve.sampling import SamplingParams
from layerzero_serve.spec_decode._coordinator import MAX_IDLE_PAUSE, SpecCoordinator


class CountingProposer:
    """Drafts ``[5]`` for every request while ``on`` is set, nothing otherwise; counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.on = False

    def propose(self, token_ids, k):
        self.calls += 1
        return [[5] if self.on else [] for _ in token_ids]


def _requests(n):
    params = SamplingParams(temperature=0.0, max_tokens=1000)
    reqs = []
    for i in range(n):
        toks = [1, 2, 3]
        reqs.append(
            SimpleNamespace(
                request_id=str(i),
                all_token_ids=toks,
                num_computed_tokens=len(toks) - 1,
                sampling_params=params,
                stop_len=1000,
            )
        )
    return reqs


def _coordinator(adaptive):
    prop = CountingProposer()
    coord = SpecCoordinator(prop, verifier=None, k_max=4, adaptive=adaptive, vocab_size=100)
    if adaptive:  # speculation looks worth it: only the idle pause can stop the asking
        coord.adaptive.best_k = lambda batch, acceptance=None: (4, 2.0)
        coord.costs.measured = lambda batch: True  # no plain-step probes in between
        coord.adaptive.min_evidence = 0.0  # no start-up shadow probes either
    return coord, prop


def test_an_idle_proposer_is_asked_on_a_vanishing_share_of_steps():
    coord, prop = _coordinator(adaptive=True)
    reqs = _requests(8)
    drafted = []
    for _ in range(500):
        drafted.append(coord.propose(reqs, len(reqs)))
    # asked at steps 1, 3, 6, 11, 20, 37, 70, then every 65: 13 calls in 500 steps
    pauses, step, calls = 1, 1, 1
    while step + pauses + 1 <= 500:
        step += pauses + 1
        calls += 1
        pauses = min(2 * pauses, MAX_IDLE_PAUSE)
    assert prop.calls == calls == 13
    assert all(d == {} for d in drafted)


def test_asking_resumes_every_step_after_a_draft():
    coord, prop = _coordinator(adaptive=True)
    reqs = _requests(2)
    for _ in range(40):
        coord.propose(reqs, 2)
    prop.on = True
    before = prop.calls
    for _ in range(MAX_IDLE_PAUSE + 1):  # within one longest pause the proposer is asked again
        drafts = coord.propose(reqs, 2)
        if prop.calls > before:
            break
    assert drafts["0"] == [5]
    n = prop.calls
    for _ in range(10):
        coord.propose(reqs, 2)
    assert prop.calls == n + 10


def test_without_adaptive_k_the_proposer_is_asked_every_step():
    coord, prop = _coordinator(adaptive=False)
    reqs = _requests(3)
    for _ in range(50):
        coord.propose(reqs, 3)
    assert prop.calls == 50


def test_draft_model_runs_eagerly_without_cuda_graphs(monkeypatch):
    """The engine hands the draft model graph buckets only when it captures graphs itself
    (CUDA, not enforce_eager): on the CPU the draft gets None and captures nothing."""
    from layerzero_serve.engine import Engine
    from layerzero_serve.spec_decode._coordinator import SpecCoordinator

    seen = {}
    build = SpecCoordinator.from_config.__func__

    def spy(cls, *args, **kwargs):
        seen["graph_buckets"] = kwargs.get("graph_buckets", "missing")
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(SpecCoordinator, "from_config", classmethod(spy))
    eng = Engine(
        model="dummy:tiny",
        device="cpu",
        speculative_method="draft_model",
        speculative_model="dummy:tiny",
        num_speculative_tokens=2,
    )
    assert seen["graph_buckets"] is None
    assert eng.spec.proposer.runner.graphs is None
