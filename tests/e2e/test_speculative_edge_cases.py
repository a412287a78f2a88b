"""Speculative decoding edge cases in the engine (CPU, eager), found in review and fixed:
seeded tokens independent of batch mates and engine history, n > 1 siblings on their own seeds,
reproducibility across processes, block tables within the graphs' width near max_model_len,
NaN logits failing only their request. Plus regression tests for edge cases the other e2e tests
do not reach: drafts cut by a tiny token budget, stops inside accepted drafts, aborts, prefix
hits on blocks holding accepted drafts, n > 1 siblings, and a draft model under preemption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch

from layerzero_serve.engine import Engine
from layerzero_serve.runner.cuda_graph import DecodeGraphRunner
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.spec_decode import Proposer

GREEDY = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
SPEC = dict(speculative_method="ngram", num_speculative_tokens=4, adaptive_speculation=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts():
    rng = np.random.default_rng(3)
    motif = rng.integers(3, 500, size=5).tolist()
    return [motif * 4 + [9], rng.integers(3, 500, size=29).tolist(), [17] * 12, motif[:2] * 6]


def _drain(eng, ids, on_step=None):
    got = {i: [] for i in ids}
    reasons = {}
    step = 0
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        step += 1
        if on_step is not None:
            on_step(step)
    return got, reasons


def _check_clean(eng):
    eng.kv_manager.check_integrity()
    assert eng.kv_manager.pool.num_free == eng.kv_manager.num_usable_blocks  # nothing leaked


def _run(prompts, params=GREEDY, **kw):
    eng = Engine(model="dummy:tiny", device="cpu", **kw)
    ids = [eng.add_request(p, params) for p in prompts]
    got, _ = _drain(eng, ids)
    _check_clean(eng)
    return [got[i] for i in ids], eng


class _FixedProposer(Proposer):
    """Deterministic drafts of a fixed length per request: the last token repeated. Requests
    whose prompt starts with MARK get one draft, the others ``k``."""

    name = "fixed"
    MARK = 1

    def propose(self, requests_tokens, k):
        return [[int(t[-1])] * (1 if t[0] == self.MARK else k) for t in requests_tokens]


# ---- findings (these fail on the reviewed code) ---------------------------------------------


def test_seeded_tokens_do_not_depend_on_batch_mates_draft_lengths():
    """verifier.py: the counters of the verification randoms are ``offset * (V + k + 1)`` with
    ``k`` the LONGEST draft of the whole batch, so a seeded request's uniforms and noise change
    with its batch mates' draft lengths."""
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=16, ignore_eos=True)
    kw = dict(speculative_method=_FixedProposer(), num_speculative_tokens=4)
    kw["adaptive_speculation"] = False
    seeded = [_FixedProposer.MARK, 40, 41, 42, 43, 44]
    eng = Engine(model="dummy:tiny", device="cpu", **kw)
    alone_id = eng.add_request(seeded, params)
    alone = _drain(eng, [alone_id])[0][alone_id]
    eng = Engine(model="dummy:tiny", device="cpu", **kw)
    mate = eng.add_request([7, 8, 9, 10], GREEDY)
    rid = eng.add_request(seeded, params)
    together = _drain(eng, [mate, rid])[0][rid]
    assert together == alone


def test_seeded_siblings_verify_with_their_own_seeds():
    """verifier.py ``_row_seed``: uses ``sampling_params.seed`` and ignores ``Request.seed``,
    so n > 1 siblings (which the engine gives distinct seeds) share one verification stream,
    and sibling #1 no longer equals a lone request with sibling #1's seed."""
    seed = 21
    sib_seed = (seed + 0x9E3779B97F4A7C15) % (1 << 63)
    prompt = [30, 31, 32, 33, 34, 35]
    out = {}
    for spec in (None, _FixedProposer()):
        kw = {} if spec is None else dict(speculative_method=spec, adaptive_speculation=False)
        eng = Engine(model="dummy:tiny", device="cpu", **kw)
        p = SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=16, ignore_eos=True)
        rid = eng.add_request(prompt, p)
        sib = _drain(eng, [rid])[0][f"{rid}#1"]
        eng = Engine(model="dummy:tiny", device="cpu", **kw)
        lone_p = SamplingParams(temperature=1.0, seed=sib_seed, max_tokens=16, ignore_eos=True)
        lid = eng.add_request(prompt, lone_p)
        out[spec is None] = (sib, _drain(eng, [lid])[0][lid])
    assert out[True][0] == out[True][1]  # plain decoding: sibling #1 == its seed alone
    assert out[False][0] == out[False][1]  # speculation: must hold as well


def test_block_tables_fit_the_graph_width_near_max_model_len(monkeypatch):
    """scheduler.py / manager.py: every allocation reserves ``num_lookahead_tokens`` slots past
    the scheduled ones, also past ``max_model_len``, so near the length limit a request's block
    table is wider than the captured graphs' static table (``ceil(graph_len / block_size)``
    columns, engine.py). ``DecodeGraphRunner._fill`` then raises on the copy, and with it every
    graph decode or verification step of the batch (GPU only; here its host staging runs on
    the CPU with the tables the CPU engine scheduled)."""
    eng = Engine(model="dummy:tiny", device="cpu", max_model_len=64, block_size=16, **SPEC)
    widths = []
    execute = eng.runner.execute

    def spy(out):
        widths.append(max(len(t) for t in out.block_ids))
        return execute(out)

    monkeypatch.setattr(eng.runner, "execute", spy)
    p = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    rid = eng.add_request(list(range(3, 43)), p)
    got, reasons = _drain(eng, [rid])
    assert len(got[rid]) == 24 and reasons[rid] == "length"
    _check_clean(eng)
    graph_len = min(eng.resolved.max_model_len, eng.scheduler.max_seq_len)
    width = -(-graph_len // 16)  # as Engine.__init__ -> enable_graphs / enable_verify_graphs
    zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, pin_memory=False, **k: zeros(*a, **k))
    g = DecodeGraphRunner(
        eng.runner.model, eng.runner.kv_cache, None, [1], width, eng.runner.device
    )
    table = np.arange(1, max(widths) + 1, dtype=np.int32)[None, :]
    one = np.zeros(1, np.int64)
    g._fill(1, 1, one, one, one, one + 1, table)  # raises: table wider than the graph's


_UNSEEDED_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from layerzero_serve.engine import Engine
    from layerzero_serve.sampling import SamplingParams
    from layerzero_serve.spec_decode import Proposer
    class Last(Proposer):
        def propose(self, requests_tokens, k):
            return [[int(t[-1])] * k for t in requests_tokens]
    torch.set_num_threads(1)
    out = []
    for kw in ({}, dict(speculative_method=Last(), adaptive_speculation=False)):
        eng = Engine(model="dummy:tiny", device="cpu", seed=0, **kw)
        p = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
        rid = eng.add_request([5, 6, 7, 8] * 4, p)
        toks = []
        while eng.has_unfinished():
            for o in eng.step():
                toks += o.new_token_ids
        out.append(toks)
    print(json.dumps(out))
    """
)


def test_unseeded_sampling_with_speculation_reproducible_across_processes():
    """verifier.py ``_row_seed``: an unseeded request's verification stream is Python's
    ``hash((seed, request_id, "spec"))``, salted per process (PYTHONHASHSEED), so the same
    engine seed and workload give other tokens in another process; the sampler's own streams
    come from ``EngineConfig.seed`` and do not."""
    runs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        res = subprocess.run(
            [sys.executable, "-c", _UNSEEDED_SCRIPT],
            env=env,
            cwd=tempfile.gettempdir(),  # never the repository root (kernels/ shadows PyPI's)
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        runs.append(res.stdout.strip().splitlines()[-1])
    plain, spec = zip(*(json.loads(r) for r in runs), strict=True)
    assert plain[0] == plain[1]  # the sampler's streams: reproducible
    assert spec[0] == spec[1]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_fail_verification_rows_as_they_fail_sampled_rows(monkeypatch, temperature):
    """verifier.py / model_runner.py ``_verify``: the sampler fails a row whose logits are NaN
    (finish_reason "error"), but a verification row never checks its logits: argmax / the
    rejection kernel over NaN yields token 0 and the request goes on emitting garbage."""
    reasons = {}
    for kw in ({}, dict(speculative_method=_FixedProposer(), adaptive_speculation=False)):
        eng = Engine(model="dummy:tiny", device="cpu", **kw)
        p = SamplingParams(temperature=temperature, seed=3, max_tokens=12, ignore_eos=True)
        rid = eng.add_request([40, 41, 42, 43, 44], p)
        eng.step()  # prefill: the first token is sampled from finite logits
        logits = eng.runner.model.compute_logits
        monkeypatch.setattr(
            eng.runner.model, "compute_logits", lambda h, f=logits: f(h) * float("nan")
        )
        got, reason = _drain(eng, [rid])
        _check_clean(eng)
        reasons["spec" if kw else "plain"] = (reason[rid], got[rid])
    assert reasons["plain"] == ("error", [])
    assert reasons["spec"] == ("error", [])


def test_seeded_tokens_do_not_depend_on_engine_history_with_adaptive_k():
    """coordinator.py ``propose``: with adaptive k (the default) whether a step drafts depends
    on engine-global state (the plain-probe step counter, measured step times, the acceptance
    estimate of all requests), and a drafted step draws from the verifier's stream instead of
    the sampler's, so a seeded request's tokens depend on what the engine ran before it."""
    params = SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True)
    prompt = [50, 51, 52, 53, 54, 55]
    outs = []
    for warmup in (0, 3):
        eng = Engine(model="dummy:tiny", device="cpu", speculative_method=_FixedProposer())
        if warmup:
            w = eng.add_request([9, 10, 11], SamplingParams(temperature=0.0, max_tokens=warmup))
            _drain(eng, [w])
        rid = eng.add_request(prompt, params)
        outs.append(_drain(eng, [rid])[0][rid])
    assert outs[0] == outs[1]


# ---- regression tests (pass): edge cases the other e2e tests do not reach --------------------


@pytest.mark.parametrize("budget", [2, 3, 6])
def test_drafts_cut_by_a_tiny_token_budget_keep_greedy_output(budget):
    kw = dict(max_num_batched_tokens=budget, block_size=4)
    ref, _ = _run(_prompts(), **kw)
    out, eng = _run(_prompts(), **kw, **SPEC)
    assert out == ref
    assert eng.stats()["speculative"]["accepted_tokens"] > 0


def test_stop_token_inside_accepted_drafts(monkeypatch):
    """The draft model equal to the target accepts every draft, so stops land inside runs of
    accepted drafts: the tokens after the stop are dropped, the blocks committed and freed."""
    from layerzero_serve.scheduler._scheduler import Scheduler

    cut = []
    append = Scheduler._append

    def spy(req, toks):
        status, new = append(req, toks)
        cut.append(len(new) < len(toks))
        return status, new

    monkeypatch.setattr(Scheduler, "_append", staticmethod(spy))
    prompt = _prompts()[1]
    (ref,), _ = _run([prompt], block_size=4)
    kw = dict(speculative_method="draft_model", speculative_model="dummy:tiny")
    kw.update(num_speculative_tokens=4, adaptive_speculation=False, block_size=4)
    firsts = [j for j in range(2, len(ref)) if ref[j] not in ref[:j]]  # first occurrences
    for j in firsts[1::3][:4]:
        p = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[ref[j]])
        eng = Engine(model="dummy:tiny", device="cpu", **kw)
        rid = eng.add_request(prompt, p)
        got, reasons = _drain(eng, [rid])
        _check_clean(eng)
        assert got[rid] == ref[: j + 1] and reasons[rid] == "stop"
    assert sum(cut) >= 2  # stops that dropped accepted tokens after them


def test_abort_between_drafted_steps_frees_everything():
    prompts = _prompts()
    ref, _ = _run(prompts)
    eng = Engine(model="dummy:tiny", device="cpu", block_size=4, **SPEC)
    ids = [eng.add_request(p, GREEDY) for p in prompts]

    def abort(step):
        if step == 4:
            assert eng.abort(ids[0])
            eng.kv_manager.check_integrity()

    got, reasons = _drain(eng, ids, abort)
    _check_clean(eng)
    assert reasons[ids[0]] == "abort"
    assert [got[i] for i in ids[1:]] == ref[1:]
    assert not eng.spec.proposer._indexes and not eng.spec.metrics._requests


def test_prefix_hits_on_blocks_holding_accepted_drafts():
    prompt = _prompts()[0]
    eng = Engine(model="dummy:tiny", device="cpu", block_size=4, **SPEC)
    a = eng.add_request(prompt, GREEDY)
    first = _drain(eng, [a])[0][a]
    assert eng.stats()["speculative"]["accepted_tokens"] > 0
    follow = prompt + first[:22]  # its blocks were committed by verification rows
    b = eng.add_request(follow, GREEDY)
    hits = eng.kv_manager.stats.hits
    second = _drain(eng, [b])[0][b]
    eng.kv_manager.check_integrity()  # every cached block's hash recomputes from its tokens
    assert eng.kv_manager.stats.hits - hits >= len(follow) - 4
    ((ref,), _) = _run([follow], block_size=4)
    assert second == ref


def test_n_greedy_siblings_with_speculation():
    prompt = _prompts()[0]
    (ref,), _ = _run([prompt])
    eng = Engine(model="dummy:tiny", device="cpu", block_size=4, **SPEC)
    rid = eng.add_request(prompt, SamplingParams(temperature=0.0, n=3, max_tokens=30))
    got, _ = _drain(eng, [rid])
    _check_clean(eng)
    assert [got[f"{rid}#{k}"] for k in range(3)] == [ref[: len(got[f"{rid}#0"])]] * 3


def test_mixed_batch_of_prefills_plain_decodes_and_drafted_rows():
    prompts = _prompts()
    penal = SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.2)
    kinds = []

    def run(**kw):
        eng = Engine(model="dummy:tiny", device="cpu", block_size=4, **kw)
        execute = eng.runner.execute

        def spy(out):
            drafted = bool(out.drafts)
            plain = any(
                r.request_id not in out.drafts
                and s + 1 == len(r.all_token_ids)
                and r.num_output_tokens
                for r, s in zip(out.requests, out.starts, strict=True)
            )
            prefill = any(
                n > 1 and r.request_id not in out.drafts
                for r, n in zip(out.requests, out.num_scheduled, strict=True)
            )
            kinds.append((drafted, plain, prefill))
            return execute(out)

        eng.runner.execute = spy
        ids = [eng.add_request(prompts[0], GREEDY), eng.add_request(prompts[1], penal)]
        later = iter(prompts[2:])

        def admit(step):
            if step % 3 == 0:
                p = next(later, None)
                if p is not None:
                    ids.append(eng.add_request(p, GREEDY))

        got, _ = _drain(eng, ids, admit)
        _check_clean(eng)
        return [got[i] for i in ids]

    ref = run()
    kinds.clear()
    assert run(speculative_method=_FixedProposer(), adaptive_speculation=False) == ref
    assert (True, True, True) in kinds


def test_draft_model_under_preemption_keeps_greedy_output():
    prompts = _prompts() * 2
    kw = dict(num_kv_blocks=22, block_size=4, max_num_batched_tokens=32)
    ref, plain = _run(prompts, **kw)
    out, eng = _run(
        prompts,
        speculative_method="draft_model",
        speculative_model="dummy:tiny",
        num_speculative_tokens=3,
        adaptive_speculation=False,
        **kw,
    )
    assert out == ref
    assert eng.scheduler.num_preemptions > 0
    proposer = eng.spec.proposer
    assert not proposer._mirrors and proposer.kv.pool.num_free == proposer.kv.num_usable_blocks
