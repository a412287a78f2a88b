"""Async scheduling's engine wiring on the CPU. The launch/collect pair (CUDA graphs in
production) is replaced by a stand-in with the same contract: a step launched ahead gets the
previous step's tokens as its input ids and samples one token further, and runs eagerly here.
Everything else is the real engine, scheduler, sampler and speculative coordinator: the engine
gets exactly the tokens of the synchronous engine through EOS stops, aborts, admissions, seeded
sampling and forks; speculation configured with nothing to draft launches ahead, and shadow
probes decided for launched-ahead steps are drafted and scored."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from engine_driver import drive

import layerzero_serve._async_scheduling as async_mod
from layerzero_serve._async_scheduling import AsyncScheduling
from layerzero_serve.engine import Engine
from layerzero_serve.runner._async_decode import PendingDecode
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.spec_decode import Proposer
from layerzero_serve.spec_decode._adaptive import LinearStepCost
from layerzero_serve.types import RequestStatus

pytestmark = pytest.mark.usefixtures("one_thread")


def _stand_in_launch(runner, out, prev=None):
    """Run the step now (eagerly); a launched-ahead step reads ``prev``'s tokens as inputs."""
    if prev is not None:
        for r, toks in zip(prev.out.requests, prev.tokens, strict=True):
            r.all_token_ids.append(toks[0] if toks else 0)  # the device copy of the ids
    try:
        tokens = runner.execute(out)
    finally:
        if prev is not None:
            for r in prev.out.requests:
                r.all_token_ids.pop()
    return PendingDecode(out, tokens, None)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(async_mod, "launch_decode", _stand_in_launch)
    monkeypatch.setattr(async_mod, "collect_decode", lambda runner, pending: pending.tokens)


def _engine(async_on: bool, **kw) -> Engine:
    eng = Engine(model="dummy:tiny", device="cpu", seed=0, **kw)
    if async_on:
        eng._set_execution(AsyncScheduling(eng.runner, eng.scheduler))
    return eng


def _requests(eos_ids=()):
    rng = np.random.default_rng(4)
    out = []
    for i, n in enumerate((3, 9, 17, 6, 11, 2)):
        prompt = rng.integers(3, 500, size=n).tolist()
        if i % 3 == 0:
            sp = SamplingParams(temperature=0.0, max_tokens=20 + i, stop_token_ids=list(eos_ids))
        elif i % 3 == 1:
            sp = SamplingParams(temperature=0.8, top_k=50, seed=i, max_tokens=15 + i)
        else:
            sp = SamplingParams(temperature=0.7, top_p=0.9, seed=i, n=2, max_tokens=18)
        out.append((prompt, sp))
    return out


_run = drive


def test_async_engine_gives_the_synchronous_tokens(stand_in):
    plain = _run(_engine(False), _requests())
    stops = sorted({toks[len(toks) // 2] for toks, _ in plain.values()})[:3]
    late = (7, [5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=9))
    reqs = _requests(eos_ids=stops)
    sync = _run(_engine(False), reqs, abort_at=(5, 1), late=late)
    eng = _engine(True)
    assert _run(eng, reqs, abort_at=(5, 1), late=late) == sync
    assert any(r == "stop" for _, r in sync.values())
    assert eng._async.steps_ahead > 10 and eng.stats()["async_steps_ahead"] > 10


class NeverDrafts(Proposer):
    name = "never"

    def propose(self, requests_tokens, k):
        return [[] for _ in requests_tokens]


class FixedDraft(Proposer):
    """One draft per request, always ``token``."""

    name = "fixed"

    def __init__(self, token: int) -> None:
        self.token = token

    def propose(self, requests_tokens, k):
        return [[self.token] for _ in requests_tokens]


@pytest.mark.parametrize("drafts", ["never", "wrong"])
def test_speculative_engine_launches_ahead_and_shadow_probes_ride_along(stand_in, drafts):
    reqs = [(p, sp) for p, sp in _requests() if sp.n == 1]
    plain = _run(_engine(False), reqs)
    emitted = {t for toks, _ in plain.values() for t in toks}
    wrong = next(t for t in range(3, 500) if t not in emitted)  # never the emitted token
    proposer = NeverDrafts() if drafts == "never" else FixedDraft(wrong)
    eng = _engine(True, speculative_method=proposer)
    # verification as costly as on a large batch, so wrong drafts keep speculation off, and a
    # probe every 5 steps off: the probes come with launched-ahead steps
    eng.spec.adaptive.step_cost = LinearStepCost(per_token=0.5)
    eng.spec.adaptive.probe_interval = 5
    assert _run(eng, reqs) == plain
    stats = eng.spec.stats()
    assert eng._async.steps_ahead > 10 and stats["drafts"] == 0
    if drafts == "wrong":  # probes decided for launched-ahead steps were drafted and scored
        assert stats["shadow_probes"] >= 3 * len(reqs) and stats["shadow_hits"] == 0


def test_a_synchronous_steps_shadow_probe_is_drafted_after_its_launch(monkeypatch):
    """A shadow probe's drafts are no input of its step: the proposer runs once the step is on
    the device (its host time overlaps the step), never before the launch."""
    events = []

    def launch(runner, out, prev=None):
        events.append("launch")
        return _stand_in_launch(runner, out, prev)

    class Recording(FixedDraft):
        def propose(self, requests_tokens, k):
            events.append("propose")
            return super().propose(requests_tokens, k)

    monkeypatch.setattr(async_mod, "launch_decode", launch)
    monkeypatch.setattr(async_mod, "collect_decode", lambda runner, pending: pending.tokens)
    reqs = [(p, sp) for p, sp in _requests() if sp.n == 1]
    plain = _run(_engine(False), reqs)
    emitted = {t for toks, _ in plain.values() for t in toks}
    eng = _engine(
        True, speculative_method=Recording(next(t for t in range(3, 500) if t not in emitted))
    )
    eng.spec.adaptive.step_cost = LinearStepCost(per_token=0.5)  # wrong drafts: stay off
    assert _run(eng, reqs) == plain
    assert eng.spec.stats()["shadow_probes"] > 0 and "propose" in events
    assert events[0] == "launch"  # the first decode step's probe came after its launch
    assert ("propose", "propose") not in set(pairwise(events))  # one probe per launched step


def _stale_ahead_engine(**kw):
    """An engine whose last request stopped on a stop id while the next step was already
    launched: it goes idle with that (stale) step still in flight."""
    prompt = [7, 8, 9, 10]
    plain = _run(_engine(False), [(prompt, SamplingParams(temperature=0.0, max_tokens=30))])
    ((toks, _),) = plain.values()
    at = next(p for p in range(8, len(toks)) if toks[p] not in toks[:p])  # a first occurrence
    stop = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[toks[at]])
    eng = _engine(True, **kw)
    if eng.spec is not None:  # costly verification: drafts stay off, steps launch ahead
        eng.spec.adaptive.step_cost = LinearStepCost(per_token=0.5)
    rid = eng.add_request(prompt, stop, request_id="a")
    while eng.has_unfinished():
        eng.step()
    assert eng._async.ahead is not None  # launched before the stop was seen
    return eng, rid


def test_a_stale_step_is_dropped_when_the_engine_resumes(stand_in):
    eng, _ = _stale_ahead_engine(speculative_method=FixedDraft(3))
    plain_times = dict(eng.spec.costs.plain)
    new = eng.add_request([11, 12, 13], SamplingParams(temperature=0.0, max_tokens=5))
    outs = eng.step()  # the new request's prefill, not the stale step's (empty) results
    assert [o.request_id for o in outs] == [new] and outs[0].new_token_ids
    assert eng.spec.costs.plain == plain_times  # the idle time was not taken for a step time
    while eng.has_unfinished():
        eng.step()


def test_a_stale_failed_row_does_not_fail_a_new_request_with_its_id(monkeypatch):
    def collect_with_garbage(runner, pending):  # the stale row's garbage input gives NaN
        tokens = pending.tokens
        for row, r in enumerate(pending.out.requests):
            if r.status is not RequestStatus.RUNNING:
                tokens[row].clear()
                tokens.failed[row] = "logits contain NaN"
        return tokens

    monkeypatch.setattr(async_mod, "launch_decode", _stand_in_launch)
    monkeypatch.setattr(async_mod, "collect_decode", collect_with_garbage)
    eng, rid = _stale_ahead_engine()
    eng._async.take_stale = lambda: False  # reach the stale step's results the hard way
    again = eng.add_request(
        [11, 12, 13], SamplingParams(temperature=0.0, max_tokens=5), request_id=rid
    )
    got, reason = [], None
    while eng.has_unfinished():
        for o in eng.step():
            got += o.new_token_ids
            reason = o.finish_reason or reason
    assert again == rid and len(got) == 5 and reason == "length"


def test_decode_inputs_of_a_pure_decode_step():
    """The host inputs the decode graphs read (shared by the synchronous and async paths)."""
    eng = _engine(False, block_size=4)
    for p, sp in _requests()[:3]:
        eng.add_request(p, sp)
    eng.step()  # prefills
    out = eng.scheduler.schedule()
    assert out.is_pure_decode()
    ids, starts, slots, table = eng.runner.decode_inputs(out)
    for i, (r, s, blocks) in enumerate(zip(out.requests, out.starts, out.block_ids, strict=True)):
        assert ids[i] == r.all_token_ids[s] and starts[i] == s
        assert slots[i] == blocks[s // 4] * 4 + s % 4 and list(table[i, : len(blocks)]) == blocks
    assert not eng.runner.decode_inputs(out, ids_known=False)[0].any()
