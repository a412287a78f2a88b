"""Adaptive speculation gathers acceptance evidence with shadow probes (drafts scored against
the plain step's own tokens, never verified): a proposer whose drafts are always wrong costs no
verification pass at all, one whose drafts are right turns speculation on after the start-up
probes, and the scores are exact (hits counted against an independent plain run)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from layerzero_serve.engine import Engine
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.spec_decode import Proposer
from layerzero_serve.spec_decode._adaptive import AdaptiveK, LinearStepCost
from layerzero_serve.spec_decode._coordinator import MIN_EVIDENCE

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = 40


def _prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(3, 500, size=n).tolist() for n in (7, 19, 12)]


def _params(temperature):
    return SamplingParams(temperature=temperature, max_tokens=TOKENS, ignore_eos=True, seed=5)


def _generate(eng, prompts, params):
    ids = [eng.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    return [prompts[j] + got[i] for j, i in enumerate(ids)]


def _decode_ready(request_id: str, tokens: list[int]) -> SimpleNamespace:
    """A running request as the coordinator sees it, ready to decode its next token."""
    return SimpleNamespace(
        request_id=request_id,
        all_token_ids=list(tokens),
        num_computed_tokens=len(tokens) - 1,
        sampling_params=SamplingParams(temperature=0.0, max_tokens=100),
        stop_len=100,
    )


class ReplayProposer(Proposer):
    """Drafts from known full sequences: right (``wrong=False``) or off by one id."""

    name = "replay"

    def __init__(self, sequences, wrong: bool):
        self.sequences, self.wrong, self.asked = sequences, wrong, []

    def propose(self, requests_tokens, k):
        out = []
        for toks in requests_tokens:
            seq = next(s for s in self.sequences if s[: len(toks)] == list(toks))
            d = seq[len(toks) : len(toks) + k]
            out.append([(t + 1) % 500 if self.wrong else t for t in d])
        self.asked.append(k)
        return out


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_wrong_drafts_never_cost_a_verification_pass(temperature):
    prompts, params = _prompts(), _params(temperature)
    plain = _generate(Engine(model="dummy:tiny", device="cpu"), prompts, params)
    prop = ReplayProposer(plain, wrong=True)
    eng = Engine(model="dummy:tiny", device="cpu", speculative_method=prop)
    # verification as costly as on a large batch (a 2-token row step costs 1.6x a plain one),
    # and a probe every 5 steps off: without shadow probes those would be verification passes
    eng.spec.adaptive.step_cost = LinearStepCost(per_token=0.5)
    eng.spec.adaptive.probe_interval = 5
    got = _generate(eng, prompts, params)
    assert got == plain  # lossless, and the same tokens as the plain engine
    stats = eng.spec.stats()
    assert stats["drafts"] == 0  # nothing was ever verified
    # two start-up probe steps (3, then 0.9 * 3 + 3 >= MIN_EVIDENCE outcomes), then probes
    # after 5 and 10 steps off (the next one, 20 steps on, falls past the 40 tokens)
    assert 2 * len(prompts) >= MIN_EVIDENCE and stats["shadow_probes"] == 4 * len(prompts)
    assert stats["shadow_hits"] == 0
    assert set(prop.asked) == {1}  # every call was a one-draft shadow probe


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_right_drafts_turn_speculation_on_after_the_probes(temperature):
    prompts, params = _prompts(), _params(temperature)
    plain = _generate(Engine(model="dummy:tiny", device="cpu"), prompts, params)
    prop = ReplayProposer(plain, wrong=False)
    eng = Engine(model="dummy:tiny", device="cpu", speculative_method=prop)
    got = _generate(eng, prompts, params)
    assert got == plain
    stats = eng.spec.stats()
    # every shadow draft is the token plain decoding emits (sampled rows too: same stream)
    assert stats["shadow_probes"] > 0 and stats["shadow_hits"] == stats["shadow_probes"]
    assert stats["drafts"] > 0 and stats["acceptance_rate"] == 1.0
    assert prop.asked[0] == 1 and max(prop.asked) == eng.spec.k_max


def test_min_evidence_makes_every_step_a_probe_until_observed():
    ak = AdaptiveK(4, min_evidence=3.0, decay=0.5)
    assert [ak.choose(8) for _ in range(3)] == [1, 1, 1] and ak.probing
    ak.update([1, 1], [1, 1])  # 2 outcomes: not yet
    assert ak.choose(8) == 1 and ak.probing
    ak.update([1, 1], [1, 1])  # 0.5 * 2 + 2 = 3 outcomes, all hits
    assert ak.choose(8) == 4 and not ak.probing
    assert AdaptiveK(4).choose(8) == 4  # default: the prior alone decides
    with pytest.raises(ValueError, match="min_evidence"):
        AdaptiveK(4, min_evidence=-1.0)


def test_shadow_probes_ask_a_rotating_slice_of_a_large_batch():
    from layerzero_serve.spec_decode._coordinator import SHADOW_ROWS, SpecCoordinator

    class Recording(Proposer):
        name = "recording"

        def __init__(self):
            self.asked = []

        def propose(self, requests_tokens, k):
            self.asked.append([t[0] for t in requests_tokens])
            return [[7] for _ in requests_tokens]

    reqs = [_decode_ready(str(i), [i, 1, 2]) for i in range(20)]
    prop = Recording()
    coord = SpecCoordinator(prop, verifier=None, k_max=4, adaptive=True, vocab_size=100)
    for _ in range(3):  # start-up: every step is a shadow probe while no outcome is in
        assert coord.propose(reqs, len(reqs)) == {}  # nothing is scheduled
        assert len(coord._shadow) == SHADOW_ROWS
        coord.score_shadow(reqs, [[] for _ in reqs])  # e.g. failed rows: nothing to score
    assert prop.asked == [list(range(8)), list(range(8, 16)), [16, 17, 18, 19, 0, 1, 2, 3]]
    assert coord.shadow_probes == 0 and not coord._shadow
    coord.propose(reqs, len(reqs))  # rows 4..11; the odd ones emit the drafted 7
    coord.score_shadow(reqs, [[7] if i % 2 else [3] for i in range(20)])
    assert prop.asked[-1] == list(range(4, 12))
    assert (coord.shadow_probes, coord.shadow_hits) == (SHADOW_ROWS, 4)


def test_next_is_plain_decides_the_next_step_once():
    """Async scheduling asks for the next step's decision early: a plain decision is consumed
    by the launched-ahead step (no propose); any other is kept for the next propose."""
    from layerzero_serve.spec_decode._coordinator import SpecCoordinator

    class Counting(Proposer):
        name = "counting"
        calls = 0

        def propose(self, requests_tokens, k):
            Counting.calls += 1
            return [[7] * k for _ in requests_tokens]

    req = _decode_ready("r", [1, 2, 3])
    coord = SpecCoordinator(Counting(), verifier=None, k_max=4, adaptive=True, vocab_size=100)
    coord.adaptive.min_evidence = 0.0
    coord.adaptive.best_k = lambda batch, acceptance=None: (0, 1.0)  # speculation off
    assert coord.next_is_plain(1) and coord._decided is None and Counting.calls == 0
    coord.adaptive.best_k = lambda batch, acceptance=None: (3, 2.0)  # worth it again
    assert not coord.next_is_plain(1) and coord._decided == (3, False)
    coord.adaptive.best_k = lambda batch, acceptance=None: (0, 1.0)  # not asked again:
    drafts = coord.propose([req], 1)  # the kept decision drafts 3
    assert drafts == {req.request_id: [7, 7, 7]} and coord.last_k == 3 and coord._decided is None


def test_a_shadow_probe_decided_ahead_is_drafted_after_the_tokens_arrive():
    """next_is_plain lets a shadow-probe step launch ahead; propose_shadow drafts it later
    from the tokens known then, and score_shadow scores it with that step's tokens."""
    from layerzero_serve.spec_decode._coordinator import SpecCoordinator

    class LastPlusOne(Proposer):
        name = "last+1"

        def propose(self, requests_tokens, k):
            return [[t[-1] + 1] for t in requests_tokens]

    req = _decode_ready("r", [1, 2, 3])
    coord = SpecCoordinator(LastPlusOne(), verifier=None, k_max=4, adaptive=True, vocab_size=100)
    assert coord.next_is_plain(1) and coord.shadow_due  # start-up: a shadow probe, launched
    assert not coord._shadow  # nothing drafted before the tokens are known
    req.all_token_ids.append(9)  # the previous step's token arrives; the next step is running
    req.num_computed_tokens = 3
    coord.propose_shadow([req])  # remembered for scoring only: a shadow draft is never scheduled
    assert coord._shadow == {"r": 10} and not coord.shadow_due
    coord.score_shadow([req], [[10]])
    assert (coord.shadow_probes, coord.shadow_hits) == (1, 1)


def test_ngram_shadow_probes_build_no_index_and_real_drafting_does():
    """Shadow probes ask the n-gram proposer without ids (a scan: no per-request index built
    for requests that are not speculating); verified drafting passes the ids (indexed)."""
    from layerzero_serve.spec_decode import NgramProposer
    from layerzero_serve.spec_decode._coordinator import SpecCoordinator

    reqs = [_decode_ready(str(i), [i, 5, 6, 7, 5, 6]) for i in range(4)]
    prop = NgramProposer(k=4, min_n=1, max_n=2)
    coord = SpecCoordinator(prop, verifier=None, k_max=4, adaptive=True, vocab_size=100)
    coord.adaptive.min_evidence = 1e9  # probe every step: every request asked every time
    for _ in range(3):
        coord.propose(reqs, len(reqs))
        assert coord._shadow == {"0": 7, "1": 7, "2": 7, "3": 7}  # after "6": 7 (scanned)
        coord.score_shadow(reqs, [[1] for _ in reqs])
    assert prop._indexes == {}
    coord.adaptive.min_evidence = 0.0
    coord.adaptive.best_k = lambda batch, acceptance=None: (2, 2.0)  # speculation on
    for _ in range(2):
        drafts = coord.propose(reqs, len(reqs))
    assert [drafts[r.request_id] for r in reqs] == [[7, 5]] * 4
    assert sorted(prop._indexes) == ["0", "1", "2", "3"]  # asked with ids
