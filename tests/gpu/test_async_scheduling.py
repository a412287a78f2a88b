"""Async scheduling (GPU only): with the next decode step launched before the host reads this
one's tokens, every request gets exactly the tokens and finish reasons it gets without async
scheduling, through stops inside the pipelined steady state, length limits, seeded sampling,
n > 1 samples (sharing their prompt's blocks), an abort and an admission mid-run; steps were in
fact launched ahead, and no KV block leaks (``engine_driver.drive`` checks)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from engine_driver import drive  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402
from layerzero_serve.spec_decode import Proposer  # noqa: E402

MODEL = "dummy:small-d128"


def _engine(async_scheduling: bool, **kw) -> Engine:
    return Engine(
        model=MODEL,
        max_num_seqs=16,
        max_model_len=512,
        num_kv_blocks=512,
        async_scheduling=async_scheduling,
        **kw,
    )


def _run(async_scheduling: bool, requests, abort_at=None, late=None, **kw):
    """``drive`` a fresh engine; returns its results by request name and the engine."""
    eng = _engine(async_scheduling, **kw)
    return drive(eng, requests, abort_at, late), eng


def _requests(stop_ids=()):
    rng = np.random.default_rng(7)
    out = []
    for i, n in enumerate((3, 9, 17, 40, 6, 11, 2, 25)):
        prompt = rng.integers(0, 2048, size=n).tolist()
        if i % 3 == 0:
            sp = SamplingParams(temperature=0.0, max_tokens=30 + i, stop_token_ids=list(stop_ids))
        elif i % 3 == 1:
            sp = SamplingParams(temperature=0.8, top_k=50, seed=i, max_tokens=20 + 2 * i)
        else:
            sp = SamplingParams(temperature=0.7, top_p=0.9, seed=i, n=2, max_tokens=24)
        out.append((prompt, sp))
    return out


def test_async_scheduling_gives_the_synchronous_tokens():
    plain, _ = _run(False, _requests())
    # stop ids taken from the middle of greedy outputs: requests stop inside pipelined runs
    # (request i is greedy when i % 3 == 0; forks are named "i#j")
    greedy = [toks for name, (toks, _) in plain.items() if "#" not in name and int(name) % 3 == 0]
    stops = {toks[len(toks) // 2] for toks in greedy}
    reqs = _requests(stop_ids=sorted(stops))
    late = (12, [5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=16))
    sync, _ = _run(False, reqs, abort_at=(9, 4), late=late)
    overlapped, eng = _run(True, reqs, abort_at=(9, 4), late=late)
    assert overlapped == sync
    assert any(r == "stop" for _, r in sync.values())  # stops were exercised
    assert eng._async.steps_ahead > 10


def test_stateful_sampling_runs_synchronously_with_the_same_tokens():
    rng = np.random.default_rng(9)
    reqs = [
        (rng.integers(0, 2048, size=8).tolist(), SamplingParams(max_tokens=12, seed=1)),
        (
            rng.integers(0, 2048, size=5).tolist(),
            SamplingParams(max_tokens=12, seed=2, repetition_penalty=1.3, logprobs=2),
        ),
    ]
    sync, _ = _run(False, reqs)
    overlapped, eng = _run(True, reqs)
    assert overlapped == sync


class NeverDrafts(Proposer):
    name = "never"

    def propose(self, requests_tokens, k):
        return [[] for _ in requests_tokens]


def test_speculative_engine_runs_ahead_while_its_k_is_zero():
    """With speculation configured, steps whose adaptive k is 0 (decided before the previous
    step's tokens are known) are launched ahead too; with a proposer that never drafts the
    tokens are exactly plain decoding's."""
    reqs = _requests()
    got, eng = _run(True, reqs, speculative_method=NeverDrafts())
    assert got == _run(False, reqs)[0]
    assert eng._async.steps_ahead > 10
