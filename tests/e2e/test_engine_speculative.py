"""Speculative decoding in the engine (CPU, eager): greedy output is token-identical to plain
decoding for every k, through chunked prefill, prefix hits and preemption; rejected positions
are rolled back (KV integrity, no leaked blocks); seeded sampled requests stay reproducible
across batch compositions; metrics add up; bad configuration is rejected."""

from __future__ import annotations

import numpy as np
import pytest

from layerzero_serve.config import EngineConfig
from layerzero_serve.engine import Engine
from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.spec_decode import Proposer

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts():
    rng = np.random.default_rng(7)
    motif = rng.integers(0, 500, size=6).tolist()
    return [
        motif * 4 + [3, 4],  # repetitive: the n-gram lookup finds drafts
        rng.integers(0, 500, size=37).tolist(),  # random: drafts mostly rejected
        [13] * 20,
        motif[:3] * 7,
        [1, 2, 3],
    ]


def _run(prompts, params=GREEDY, **kw):
    eng = Engine(model="dummy:tiny", device="cpu", **kw)
    ids = [eng.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    eng.kv_manager.check_integrity()
    assert eng.kv_manager.pool.num_free == eng.kv_manager.num_usable_blocks  # nothing leaked
    return [got[i] for i in ids], eng


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_greedy_output_identical_to_plain_decoding(k):
    prompts = _prompts()
    ref, plain = _run(prompts)
    out, eng = _run(
        prompts, speculative_method="ngram", num_speculative_tokens=k, adaptive_speculation=False
    )
    assert out == ref
    s = eng.stats()["speculative"]
    assert s["drafted_tokens"] > 0 and 0 < s["accepted_tokens"] <= s["drafted_tokens"]
    assert eng.runner.timings.steps < plain.runner.timings.steps  # accepted drafts save steps


def test_greedy_identical_under_chunking_prefix_hits_and_preemption():
    prompts = _prompts() * 2  # repeats: prefix-cache hits
    kw = dict(num_kv_blocks=24, block_size=4, max_prefill_chunk=7, max_num_batched_tokens=64)
    ref, plain = _run(prompts, **kw)
    out, eng = _run(
        prompts,
        speculative_method="ngram",
        num_speculative_tokens=4,
        adaptive_speculation=False,
        **kw,
    )
    assert out == ref
    assert eng.scheduler.num_preemptions > 0 and eng.kv_manager.stats.hits > 0


def test_adaptive_k_keeps_greedy_output():
    prompts = _prompts()
    ref, _ = _run(prompts)
    out, eng = _run(prompts, speculative_method="ngram", num_speculative_tokens=6)
    assert out == ref
    assert 0 <= eng.stats()["speculative"]["last_k"] <= 6


def test_seeded_sampling_with_speculation_is_reproducible_across_batches():
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=11, max_tokens=24)
    prompts = _prompts()
    kw = dict(speculative_method="ngram", num_speculative_tokens=4, adaptive_speculation=False)
    alone, _ = _run([prompts[0]], params, **kw)
    together, _ = _run(prompts[::-1], params, **kw)
    assert together[-1] == alone[0]
    assert all(0 <= t < 512 for seq in together for t in seq)


def test_requests_with_per_token_state_do_not_speculate():
    params = SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3)
    ref, _ = _run(_prompts(), params)
    out, eng = _run(_prompts(), params, speculative_method="ngram", num_speculative_tokens=4)
    assert out == ref
    assert eng.stats()["speculative"]["drafted_tokens"] == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("speculative_method", "medusa"),
        ("num_speculative_tokens", 0),
        ("num_speculative_tokens", 17),
        ("ngram_min", 0),
        ("ngram_max", 40),
        ("adaptive_speculation", "yes"),
    ],
)
def test_bad_speculation_config_is_rejected(field, value):
    with pytest.raises(ValidationError, match=field.split("_")[0]):
        EngineConfig(**{field: value})


class _WildProposer(Proposer):
    """A user's proposer with the base signature: good guesses, junk and out-of-vocab ids."""

    name = "wild"

    def propose(self, requests_tokens, k):
        out = []
        for i, toks in enumerate(requests_tokens):
            guess = list(toks[-k:])
            if i % 3 == 1:
                guess[len(guess) // 2] = 10**9  # outside the vocabulary: must never be embedded
            if i % 3 == 2:
                guess = [-5] + guess
            out.append(guess)
        return out


def test_user_proposer_with_junk_drafts_keeps_greedy_output():
    prompts = _prompts()
    ref, _ = _run(prompts)
    out, eng = _run(
        prompts,
        speculative_method=_WildProposer(),
        num_speculative_tokens=4,
        adaptive_speculation=False,
    )
    assert out == ref
    assert eng.stats()["speculative"]["method"] == "wild"


# ---- draft model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A target and a different draft model sharing the 384-token vocabulary."""
    from hf_checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("draft")
    return (
        make_checkpoint("llama-gqa-tied", root / "target")[0],
        make_checkpoint("llama-mha-untied-bias", root / "draft")[0],
    )


def _ids(n, seed):
    rng = np.random.default_rng(seed)
    motif = rng.integers(0, 384, size=5).tolist()
    return [motif * 3 + [7], rng.integers(0, 384, size=n).tolist(), [11] * 9]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_draft_model_greedy_output_identical(two_checkpoints, k):
    target, draft = (str(p) for p in two_checkpoints)
    prompts = _ids(23, k)
    ref, _ = _run_model(target, prompts)
    out, eng = _run_model(
        target,
        prompts,
        speculative_method="draft_model",
        speculative_model=draft,
        num_speculative_tokens=k,
        adaptive_speculation=False,
    )
    assert out == ref
    s = eng.stats()["speculative"]
    assert s["method"] == "draft_model" and s["drafted_tokens"] > 0
    proposer = eng.spec.proposer
    assert not proposer._mirrors  # every finished request released its draft KV
    assert proposer.kv.pool.num_free == proposer.kv.num_usable_blocks


def test_draft_model_equal_to_the_target_accepts_everything(two_checkpoints):
    target = str(two_checkpoints[0])
    prompts = _ids(17, 1)
    ref, plain = _run_model(target, prompts)
    out, eng = _run_model(
        target,
        prompts,
        speculative_method="draft_model",
        speculative_model=target,
        num_speculative_tokens=4,
        adaptive_speculation=False,
    )
    assert out == ref
    s = eng.stats()["speculative"]
    assert s["accepted_tokens"] == s["drafted_tokens"] > 0
    assert eng.runner.timings.steps < plain.runner.timings.steps


def test_draft_model_with_another_vocabulary_is_rejected(two_checkpoints):
    with pytest.raises(ValidationError, match="vocabulary of 384"):
        Engine(
            model=str(two_checkpoints[0]),
            device="cpu",
            speculative_method="draft_model",
            speculative_model="dummy:tiny",
        )


def test_draft_model_needs_a_checkpoint():
    with pytest.raises(ValidationError, match="speculative_model"):
        EngineConfig(speculative_method="draft_model")
    with pytest.raises(ValidationError, match="speculative_model"):
        EngineConfig(speculative_method="ngram", speculative_model="dummy:tiny")


def _run_model(model, prompts, **kw):
    eng = Engine(model=model, device="cpu", **kw)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    eng.kv_manager.check_integrity()
    return [got[i] for i in ids], eng


class _EchoProposer(Proposer):
    """Always drafts: the request's last k tokens (sometimes right, often wrong)."""

    name = "echo"

    def propose(self, requests_tokens, k):
        return [list(toks[-k:]) for toks in requests_tokens]


@pytest.mark.parametrize("k", [1, 4])
def test_seeded_sampled_output_identical_with_and_without_speculation(k):
    """Verification draws each position's token with the sampler's own (seed, offset) stream:
    a seeded sampled request gets exactly the tokens plain decoding gives it."""
    params = SamplingParams(
        temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=7, max_tokens=30
    )
    prompts = _prompts()
    plain, _ = _run(prompts, params)
    spec, eng = _run(
        prompts,
        params,
        speculative_method=_EchoProposer(),
        num_speculative_tokens=k,
        adaptive_speculation=False,
    )
    assert spec == plain
    s = eng.stats()["speculative"]
    assert s["drafted_tokens"] > 0  # verification ran (acceptances depend on the draws)


def test_the_kv_budget_covers_the_draft_models_pool(two_checkpoints):
    """``kv_cache_bytes`` is the budget of every KV pool: with a draft model the target's and
    the draft's pools (the same block count) fit in it together, and use most of it."""
    target, draft = (str(p) for p in two_checkpoints)
    budget = 4 << 20
    eng = Engine(
        model=target,
        device="cpu",
        dtype="float32",
        kv_cache_bytes=budget,
        speculative_method="draft_model",
        speculative_model=draft,
    )
    ours, theirs = eng.runner.kv_cache, eng.spec.proposer.kv_cache
    assert theirs.num_blocks == ours.num_blocks
    used = ours.nbytes + theirs.nbytes
    per_block = ours.spec.bytes_per_block + theirs.spec.bytes_per_block
    assert budget - per_block < used <= budget
    alone = Engine(model=target, device="cpu", dtype="float32", kv_cache_bytes=budget)
    assert alone.runner.kv_cache.num_blocks > ours.num_blocks  # without a draft: all of it
