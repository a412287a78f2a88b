"""End to end: greedy generation through our loader + Engine is token-identical to HF
transformers ``generate`` (the oracle), for every covered architecture, with prefix caching on
and off, chunked prefill (chunks of 1, 7, 64) and forced preemption (tiny KV pool)."""

from __future__ import annotations

import pytest
import torch
from hf_checkpoints import CASES, make_checkpoint

from layerzero_serve.engine import Engine
from layerzero_serve.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPT_LENS = (1, 3, 8, 13, 16, 17, 29, 40)  # >= 8 prompts, around block boundaries
MAX_NEW = 12


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    path, hf, cfg = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    gen = torch.Generator().manual_seed(7)
    # Prompts share a common prefix so the prefix cache has something to hit.
    shared = torch.randint(0, cfg.vocab_size, (20,), generator=gen).tolist()
    prompts = []
    for i, n in enumerate(PROMPT_LENS):
        own = torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist()
        prompts.append(shared[: n // 2] + own[: n - n // 2] if i % 2 else own)
    hf.generation_config.eos_token_id = None  # run exactly MAX_NEW tokens, like ignore_eos
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(
                torch.tensor([p]),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
            expected.append(out[0, len(p) :].tolist())
    return path, prompts, expected


def _run(path, prompts, **cfg) -> list[list[int]]:
    eng = Engine(model=str(path), dtype="float32", device="cpu", block_size=4, **cfg)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    # The longest prompt goes first and is prefilled alone, so the later ones that share its
    # prefix find it in the cache (requests admitted in the same step cannot share).
    last = len(prompts) - 1
    ids = {last: eng.add_request(prompts[last], params)}
    got: dict[str, list[int]] = {ids[last]: []}
    reasons = {}
    first = eng.step()
    for i, p in enumerate(prompts[:last]):
        ids[i] = eng.add_request(p, params)
        got[ids[i]] = []
    ids = [ids[i] for i in range(len(prompts))]
    for o in first:
        got[o.request_id].extend(o.new_token_ids)
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert all(r == "length" for r in reasons.values()), reasons
    eng.kv_manager.check_integrity()
    return [got[i] for i in ids], eng


CONFIGS = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "chunk-1": {"max_prefill_chunk": 1},
    "chunk-7": {"max_prefill_chunk": 7},
    "chunk-64": {"max_prefill_chunk": 64, "max_num_batched_tokens": 64},
    "tiny-pool-preemption": {"num_kv_blocks": 20},
}


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_greedy_matches_transformers(case, config_name):
    path, prompts, expected = case
    got, eng = _run(path, prompts, **CONFIGS[config_name])
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"prompt {i} (len {len(prompts[i])}): ours {g} != HF {e}"
    if config_name == "tiny-pool-preemption":
        assert eng.scheduler.num_preemptions > 0
    if config_name == "default":
        assert eng.kv_manager.stats.hits > 0
