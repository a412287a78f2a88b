"""Prompt sharing in the engine: the n samples of a request and identical prompts arriving
together prefill the prompt once and fork its KV blocks (each sharer computes only the last
prompt token, whose logits give its own first sample). Oracle: the same requests run apart on
an engine without prefix caching, each computing its whole prompt, with the same per-sample
seeds; ``stats()["prompt_tokens_computed"]`` counts the prompt tokens through the model."""

from __future__ import annotations

import pytest

from layerzero_serve._engine_setup import sibling_seed
from layerzero_serve.engine import Engine
from layerzero_serve.sampling import SamplingParams

PROMPT = [(i * 37) % 500 + 5 for i in range(128)]
N = 4


def _run(eng: Engine, reqs) -> dict[str, list[int]]:
    for rid, prompt, sp in reqs:
        eng.add_request(prompt, sp, request_id=rid)
    out: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def _apart(lz_cache, temperature: float, seed: int | None) -> dict[str, list[int]]:
    """Each sample as its own request on an engine that shares nothing."""
    eng = Engine(device="cpu", enable_prefix_caching=False)
    reqs = [
        (
            f"a#{k}",
            PROMPT,
            SamplingParams(
                temperature=temperature,
                seed=sibling_seed(seed, k, N),
                max_tokens=10,
                ignore_eos=True,
            ),
        )
        for k in range(N)
    ]
    out = _run(eng, reqs)
    assert eng.stats()["prompt_tokens_computed"] == N * len(PROMPT)
    return out


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 7), (0.8, 12345)])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_prefill_the_prompt_once(lz_cache, one_thread, temperature, seed, prefix_caching):
    eng = Engine(device="cpu", enable_prefix_caching=prefix_caching)
    sp = SamplingParams(temperature=temperature, seed=seed, n=N, max_tokens=10, ignore_eos=True)
    got = _run(eng, [("a", PROMPT, sp)])
    stats = eng.stats()
    # the prompt once, plus the last prompt token of each other sample
    assert stats["prompt_tokens_computed"] == len(PROMPT) + N - 1
    assert stats["prefix_cache_hit_tokens"] == 0  # shared by fork, not by the prefix cache
    assert stats["kv_cache"]["used"] == 0
    assert got == _apart(lz_cache, temperature, seed)
    if temperature:
        assert len({tuple(v) for v in got.values()}) > 1  # the samples still differ


def test_identical_prompts_arriving_together_share_one_prefill(lz_cache, one_thread):
    eng = Engine(device="cpu")
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    got = _run(eng, [(f"d{k}", PROMPT, greedy) for k in range(N)])
    assert eng.stats()["prompt_tokens_computed"] == len(PROMPT) + N - 1
    alone = _run(Engine(device="cpu", enable_prefix_caching=False), [("x", PROMPT, greedy)])
    assert all(v == alone["x"] for v in got.values())


def test_a_shared_start_waits_for_the_prefill_and_hits_the_prefix_cache(lz_cache, one_thread):
    """A prompt that only starts the same does not fork: it waits one step for the other's
    blocks to be published and takes the full ones from the prefix cache."""
    eng = Engine(device="cpu")
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    other = PROMPT[:96] + [7] * 40
    got = _run(eng, [("a", PROMPT, greedy), ("b", other, greedy)])
    stats = eng.stats()
    assert stats["prefix_cache_hit_tokens"] == 96  # six full blocks of 16
    assert stats["prompt_tokens_computed"] == len(PROMPT) + len(other) - 96
    ref = Engine(device="cpu", enable_prefix_caching=False)
    assert got == _run(ref, [("a", PROMPT, greedy), ("b", other, greedy)])


def test_prompt_logprobs_samples_compute_every_position(lz_cache, one_thread):
    """Prompt logprobs need every prompt position computed: the samples do not share."""
    eng = Engine(device="cpu")
    sp = SamplingParams(temperature=0.0, n=2, max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    _run(eng, [("p", PROMPT[:40], sp)])
    assert eng.stats()["prompt_tokens_computed"] == 2 * 40


def test_sharing_survives_a_short_pool(lz_cache, one_thread):
    """With a pool too small for every sample at once, samples wait or are preempted and
    resume on their own; every output still equals the unshared run."""
    eng = Engine(device="cpu", num_kv_blocks=16, block_size=16)
    sp = SamplingParams(temperature=1.0, seed=3, n=N, max_tokens=40, ignore_eos=True)
    got = _run(eng, [("a", PROMPT, sp)])
    ref = Engine(device="cpu", enable_prefix_caching=False)
    reqs = [
        (f"a#{k}", PROMPT, SamplingParams(temperature=1.0, seed=sibling_seed(3, k, N),
                                          max_tokens=40, ignore_eos=True))
        for k in range(N)
    ]  # fmt: skip
    assert got == _run(ref, reqs)
    stats = eng.stats()
    assert stats["num_preemptions"] > 0
    assert stats["kv_cache"]["used"] == 0


@pytest.mark.parametrize("block_size", [4, 16])
def test_forks_of_forks_in_one_step(lz_cache, one_thread, block_size):
    """A sample forks from a leader that itself forked in the same step (its partial block
    still a pending copy): the copies run in order, so the second copy reads the first's
    result. Two shapes: an identical prompt with n = 2, and a prompt that is a strict prefix
    of a running one with n = 2."""
    base = [(i * 37 + 101) % 500 + 5 for i in range(13)]
    greedy = lambda n, m: SamplingParams(temperature=0.0, n=n, max_tokens=m, ignore_eos=True)  # noqa: E731
    for reqs in (
        [("a", base[:8], greedy(1, 6)), ("b", base[:8], greedy(2, 6))],
        [("long", base, greedy(1, 2)), ("short", base[:8], greedy(2, 7))],
    ):
        eng = Engine(device="cpu", block_size=block_size)
        got = _run(eng, reqs)
        ref = _run(Engine(device="cpu", block_size=block_size, enable_prefix_caching=False), reqs)
        assert got == ref
        assert eng.stats()["kv_cache"]["used"] == 0
