"""Sampling through the Engine on the embedded default model, with HF transformers in float64
as the independent oracle of the model's logits: logprobs and prompt logprobs (over chunked
prefill, with a prefix-cache hit available), penalties changing greedy output exactly as a
float64 reference predicts, min_tokens, allowed / bad ids, and a NaN row failing only its own
request while the others produce what they produce without it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_sampling_reference import process_logits as ref_process  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.llm import LLM  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402

transformers = pytest.importorskip("transformers")
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hf(default_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir, torch_dtype=torch.float64
    )
    return model.eval()


def _hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()  # [len, V] float64


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _engine(path, **kw) -> Engine:
    return Engine(model=str(path), device="cpu", dtype="float32", max_model_len=64, **kw)


def _drain(eng: Engine) -> dict:
    outs: dict = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def _tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_logprobs_and_prompt_logprobs_match_float64(default_model_dir, hf):
    eng = _engine(default_model_dir, max_prefill_chunk=4, block_size=4)
    plain = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    eng.add_request(PROMPT, plain, request_id="warm")  # fills the prefix cache with PROMPT
    _drain(eng)
    sp = SamplingParams(
        temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    eng.add_request(PROMPT, sp, request_id="lp")
    outs = _drain(eng)["lp"]
    toks = _tokens(outs)
    ref = _log_softmax(_hf_logits(hf, PROMPT + toks))
    plp = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(plp) == 1 and outs[0].prompt_logprobs is plp[0]  # once, with the first token
    plp = plp[0]
    assert len(plp) == len(PROMPT) and plp[0] is None
    for pos in range(1, len(PROMPT)):
        e = plp[pos]
        assert e.token_id == PROMPT[pos]
        assert e.logprob == pytest.approx(ref[pos - 1, PROMPT[pos]], abs=1e-4)
        assert e.top_token_ids == np.argsort(-ref[pos - 1])[:2].tolist()
        np.testing.assert_allclose(e.top_logprobs, np.sort(ref[pos - 1])[::-1][:2], atol=1e-4)
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == len(toks) == 5
    for j, (tok, e) in enumerate(zip(toks, lps, strict=True)):
        row = ref[len(PROMPT) - 1 + j]
        assert e.token_id == tok and e.rank == 1  # greedy
        assert e.logprob == pytest.approx(row[tok], abs=1e-4)
        assert e.top_token_ids[0] == tok and len(e.top_token_ids) == 3
    # the same through LLM.generate
    res = LLM(default_model_dir, device="cpu").generate([PROMPT], sp, use_tqdm=False)[0]
    assert res.token_ids == toks and len(res.outputs[0].logprobs) == 5
    assert res.prompt_logprobs[1].logprob == pytest.approx(plp[1].logprob, abs=1e-5)


def _reference_greedy(hf, prompt, n, **kw) -> tuple[list[int], list[float]]:
    """float64 greedy with the sampler's processing; also the margin of each choice."""
    seq, out, margins = list(prompt), [], []
    for _ in range(n):
        x = ref_process(_hf_logits(hf, seq)[-1], prompt=prompt, output=out, **kw)
        top2 = np.sort(x)[-2:]
        margins.append(float(top2[1] - top2[0]))
        tok = int(np.argmax(x))
        out.append(tok)
        seq.append(tok)
    return out, margins


def test_penalties_change_greedy_output_as_reference_predicts(default_model_dir, hf):
    kw = {"repetition_penalty": 1.8, "frequency_penalty": 0.7, "presence_penalty": 0.4}
    bias = {17: 2.5, 33: -1.0}
    n = 10
    eng = _engine(default_model_dir)
    base = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    eng.add_request(PROMPT, base, request_id="plain")
    pen = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logit_bias=bias, **kw)
    eng.add_request(PROMPT, pen, request_id="pen")
    outs = _drain(eng)
    plain, got = _tokens(outs["plain"]), _tokens(outs["pen"])
    expected, margins = _reference_greedy(hf, PROMPT, n, logit_bias=bias, **kw)
    assert got != plain  # the penalties matter for this prompt
    for j in range(n):
        if got[j] != expected[j]:
            assert margins[j] < 1e-3, f"step {j}: {got} vs {expected}"  # a float32 near-tie
            break


def test_min_tokens_suppresses_eos(default_model_dir):
    eng = _engine(default_model_dir)
    eos = eng.eos_token_id
    push = {eos: 100.0}  # EOS would be chosen at once
    eng.add_request([5, 6], SamplingParams(temperature=0.0, logit_bias=push), request_id="a")
    eng.add_request(
        [5, 6], SamplingParams(temperature=0.0, logit_bias=push, min_tokens=3), request_id="b"
    )
    outs = _drain(eng)
    assert _tokens(outs["a"]) == [eos] and outs["a"][-1].finish_reason == "stop"
    toks = _tokens(outs["b"])
    assert len(toks) == 4 and eos not in toks[:3] and toks[3] == eos
    assert outs["b"][-1].finish_reason == "stop"


def test_allowed_and_bad_ids_respected(default_model_dir):
    eng = _engine(default_model_dir)
    allowed = list(range(40, 52))
    sp = SamplingParams(
        temperature=1.5, max_tokens=20, ignore_eos=True, allowed_token_ids=allowed,
        bad_token_ids=[44, 45], seed=3,
    )  # fmt: skip
    eng.add_request(PROMPT, sp, request_id="allowed")
    eng.add_request(PROMPT, SamplingParams(temperature=0.0, max_tokens=6), request_id="plain")
    plain = _tokens(_drain(eng)["plain"])
    eng.add_request(PROMPT, sp, request_id="allowed2")
    bad = SamplingParams(temperature=0.0, max_tokens=6, bad_token_ids=plain[:2])
    eng.add_request(PROMPT, bad, request_id="bad")
    outs = _drain(eng)
    got = _tokens(outs["allowed2"])
    assert len(got) == 20 and set(got) <= set(allowed) - {44, 45}
    assert not set(_tokens(outs["bad"])) & set(plain[:2])


def _nan_run(path, poison: str | None) -> dict:
    eng = _engine(path)
    params = {
        "greedy": SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
        "seeded": SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, ignore_eos=True, seed=5),
        "victim": SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, seed=9),
    }
    for rid, sp in params.items():
        eng.add_request(PROMPT[: 4 + len(rid) % 3], sp, request_id=rid)
    seen: dict = {}
    schedule, compute = eng.scheduler.schedule, eng.runner.model.compute_logits

    def spy_schedule(*args, **kwargs):
        seen["out"] = schedule(*args, **kwargs)
        return seen["out"]

    def poisoned(hidden):
        logits = compute(hidden)
        out = seen["out"]
        rows = [i for i in range(len(out.requests)) if out.samples(i)]
        for k, i in enumerate(rows):
            r = out.requests[i]
            if r.request_id == poison and r.num_output_tokens == 2:
                logits[k, 3] = float("nan")  # one NaN in the row
        return logits

    eng.scheduler.schedule = spy_schedule
    eng.runner.model.compute_logits = poisoned
    outs = _drain(eng)
    eng.kv_manager.check_integrity()
    return outs


def test_nan_row_fails_only_its_request(default_model_dir):
    clean = _nan_run(default_model_dir, None)
    hit = _nan_run(default_model_dir, "victim")
    last = hit["victim"][-1]
    assert last.finished and last.finish_reason == "error" and "NaN" in last.detail
    assert _tokens(hit["victim"]) == _tokens(clean["victim"])[:2]
    for rid in ("greedy", "seeded"):
        assert _tokens(hit[rid]) == _tokens(clean[rid])
        assert hit[rid][-1].finish_reason == "length"
