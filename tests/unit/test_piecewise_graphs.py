"""Piecewise (mixed-step) graphs on the CPU: the bucket arithmetic, the input contract, and the
replay's data path (static buffers, padding to a token bucket, attention over the real tokens
only) run eagerly against the plain forward, inside the engine."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve import SamplingParams
from layerzero_serve.engine import Engine
from layerzero_serve.runner.piecewise_graphs import (
    DEFAULT_TOKEN_BUCKETS,
    PiecewiseGraphRunner,
    token_buckets,
)


def test_token_buckets_end_at_the_limit():
    assert token_buckets(64) == [16, 32, 64]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(5) == [5]
    assert token_buckets(0) == []
    assert token_buckets(4096) == [*DEFAULT_TOKEN_BUCKETS, 4096]


def _runner(buckets, capture=False):
    model = torch.nn.Identity()
    return PiecewiseGraphRunner(model, 4, 2, 8, torch.float32, buckets, torch.device("cpu"),
                                capture=capture)  # fmt: skip


def test_bucket_for_picks_the_smallest_bucket_that_fits():
    r = _runner([16, 32, 100])
    assert [r.bucket_for(t) for t in (1, 16, 17, 32, 33, 100)] == [16, 16, 32, 32, 100, 100]
    assert r.bucket_for(0) is None and r.bucket_for(101) is None


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="buckets"):
        _runner([])
    with pytest.raises(ValueError, match="buckets"):
        _runner([0, 8])
    with pytest.raises(ValueError, match="capture"):
        _runner([8], capture=True)  # CUDA graphs on a CPU device
    r = _runner([8])
    ids = torch.zeros(9, dtype=torch.int64)
    with pytest.raises(ValueError, match="tokens"):
        r.run(ids, ids, None, None)


def _generate(mixed: bool, spy: list | None = None):
    eng = Engine(model="dummy:tiny", device="cpu", dtype="float32", max_num_batched_tokens=64,
                 max_num_seqs=8, enable_prefix_caching=False)  # fmt: skip
    if mixed:
        eng.runner.enable_mixed_graphs(64, capture=False, progress=False)
        run = eng.runner.mixed_graphs.run

        def counted(ids, *a):
            spy.append(ids.shape[0])
            return run(ids, *a)

        eng.runner.mixed_graphs.run = counted
    g = torch.Generator().manual_seed(0)
    for n in (5, 37, 90, 64, 17, 3):  # chunked prefill (64-token budget) next to decode rows
        prompt = torch.randint(0, 500, (n,), generator=g).tolist()
        eng.add_request(prompt, SamplingParams(max_tokens=10, temperature=0.0, logprobs=1))
    toks: dict[str, list[int]] = {}
    lps: dict[str, list[float]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
            lps.setdefault(o.request_id, []).extend(lp.logprob for lp in o.logprobs or [])
    return toks, lps


def test_engine_through_the_mixed_path_matches_the_plain_forward():
    """Prefill chunks, mixed steps and decode steps all go through the runner (padded to
    16/32/64 tokens); tokens are identical and logprobs equal to float32 rounding."""
    seen: list[int] = []
    ref_toks, ref_lps = _generate(False)
    toks, lps = _generate(True, seen)
    assert toks == ref_toks
    for rid, ref in ref_lps.items():
        assert len(lps[rid]) == len(ref) == 10
        assert max(abs(a - b) for a, b in zip(lps[rid], ref, strict=True)) < 1e-4
    assert 64 in seen, "a full chunk of the token budget went through the runner"
    assert any(t not in (16, 32, 64) for t in seen), "no step needed padding"
    assert any(t <= 8 for t in seen), "pure decode steps (no decode graphs on the CPU)"
