"""Engine / LLM / CLI behaviour on the embedded default model: validation with clear errors
while other requests keep being served, aborts, n > 1, seeds, strings in and text out, and the
default checkpoint read by transformers as an independent oracle."""

from __future__ import annotations

import json

import pytest
import torch

from layerzero_serve._cli import main
from layerzero_serve.config import EngineConfig
from layerzero_serve.engine import Engine
from layerzero_serve.errors import RequestRejectedError, ValidationError
from layerzero_serve.llm import LLM
from layerzero_serve.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(autouse=True)
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _drain(eng: Engine) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return got


def _engine(path, **kw) -> Engine:
    return Engine(model=str(path), device="cpu", max_model_len=64, **kw)


def test_bad_inputs_raise_named_errors_and_others_keep_running(default_model_dir):
    clean = _engine(default_model_dir)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13] * 20]
    for i, p in enumerate(prompts):
        clean.add_request(p, GREEDY, request_id=f"r{i}")
    expected = _drain(clean)

    eng = _engine(default_model_dir)
    vocab = eng.vocab_size
    for i, p in enumerate(prompts):
        eng.add_request(p, GREEDY, request_id=f"r{i}")
    eng.step()  # the good requests are mid-flight when the bad ones arrive
    bad = [
        (([],), "prompt_token_ids"),
        (([1, -1],), "prompt_token_ids[1]"),
        (([1, vocab],), "prompt_token_ids[1]"),
        (([1, 2.0],), "prompt_token_ids[1]"),
        ((b"hello",), "prompt"),  # a str is a text prompt (this model has a tokenizer)
        (([1] * 64,), "prompt_token_ids"),
        (([1], SamplingParams(stop_token_ids=(vocab,))), "stop_token_ids"),
        (([1], "not params"), "params"),
        (([1], GREEDY, "r0"), "request_id"),
    ]
    for args, param in bad:
        with pytest.raises(ValueError) as ei:
            eng.add_request(*args)
        assert isinstance(ei.value, ValidationError)
        assert ei.value.param == param, (args, ei.value)
    with pytest.raises(RequestRejectedError):
        eng.add_request([1] * 64)
    got = _drain(eng)
    for rid, toks in expected.items():  # everything after the first step is as in a clean run
        assert toks[-len(got[rid]) :] == got[rid] and len(got[rid]) == len(toks) - 1
    eng.kv_manager.check_integrity()


def test_outputs_unaffected_by_bad_requests_and_aborts(default_model_dir):
    clean = _engine(default_model_dir)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13] * 20]
    for i, p in enumerate(prompts):
        clean.add_request(p, GREEDY, request_id=f"r{i}")
    expected = _drain(clean)

    eng = _engine(default_model_dir)
    for i, p in enumerate(prompts):
        eng.add_request(p, GREEDY, request_id=f"r{i}")
    eng.add_request([20, 21, 22], GREEDY, request_id="victim")
    got: dict[str, list[int]] = {}
    for o in eng.step():
        got.setdefault(o.request_id, []).extend(o.new_token_ids)
    for bad in ([], [eng.vocab_size], [1] * 64):
        with pytest.raises(ValidationError):
            eng.add_request(bad, GREEDY)
    assert eng.abort("victim") is True
    assert eng.abort("victim") is False
    assert eng.abort("never-existed") is False
    for rid, toks in _drain(eng).items():
        got.setdefault(rid, []).extend(toks)
    for rid in expected:
        assert got[rid] == expected[rid]
    assert len(got["victim"]) < GREEDY.max_tokens
    assert eng.kv_manager.num_free_blocks == eng.kv_manager.num_usable_blocks


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_size", 0),
        ("dtype", "int8"),
        ("device", "tpu"),
        ("num_kv_blocks", 1),
        ("gpu_memory_utilization", 1.5),
        ("prefix_hash", "md5"),
        ("max_model_len", 1),
    ],
)
def test_engine_config_validation_names_the_field(field, value):
    with pytest.raises(ValidationError) as ei:
        EngineConfig(**{field: value})
    assert field in ei.value.param


def test_max_model_len_above_the_model_is_rejected(default_model_dir):
    with pytest.raises(ValidationError) as ei:
        Engine(model=str(default_model_dir), device="cpu", max_model_len=10**6)
    assert ei.value.param == "max_model_len"


def test_default_model_greedy_matches_transformers(default_model_dir):
    """The default checkpoint is plain HF format: transformers reads it and agrees."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir)
    llm = LLM(default_model_dir, device="cpu")
    texts = ["You are a helpful assistant.", "The quick brown fox", "Paris"]
    ours = llm.generate(texts, GREEDY, use_tqdm=False)
    for text, res in zip(texts, ours, strict=True):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert res.prompt_token_ids == ids
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert res.token_ids == out[0, len(ids) :].tolist()
        assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)
        assert res.finish_reason == "length"
        assert res.time_to_first_token is not None and res.latency >= res.time_to_first_token


def test_llm_strings_n_and_seeds(lz_cache):
    llm = LLM(device="cpu")  # the embedded default, found through LZ_CACHE_DIR
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=123, n=3, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    alone = llm.generate("Write a short poem", sp, use_tqdm=False)[0]
    crowd = llm.generate(
        ["Explain", "Write a short poem", "Paris"], [other, sp, other], use_tqdm=False
    )[1]
    assert len(alone.outputs) == 3
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in crowd.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1  # the n samples differ
    assert all(isinstance(c.text, str) for c in alone.outputs)


def test_llm_validates_every_prompt_before_queueing(default_model_dir):
    llm = LLM(default_model_dir, device="cpu")
    with pytest.raises(ValidationError) as ei:
        llm.generate([[1, 2], [], [3]], GREEDY, use_tqdm=False)
    assert ei.value.param.startswith("prompts[1]")
    assert not llm.engine.has_unfinished()
    with pytest.raises(ValidationError) as ei:
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    assert ei.value.param == "sampling_params"


def test_cli_demo_and_generate(lz_cache, capsys):
    assert main(["demo", "--quiet", "--max-tokens", "4", "--repeat", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "prefix cache hit rate" in out and "preemptions" in out
    assert "kernels: attention_decode=torch.paged_decode" in out
    rate = float(out.split("prefix cache hit rate: ")[1].split("%")[0])
    assert rate > 0  # the second wave reuses the system prompts
    assert (
        main(
            [
                "generate",
                "--quiet",
                "--device",
                "cpu",
                "--token-ids",
                "--prompt",
                "5,6,7",
                "--max-tokens",
                "3",
                "--ignore-eos",
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == [5, 6, 7] and line["finish_reason"] == "length"
    assert main(["generate", "--quiet", "--device", "cpu", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err


def test_ignore_eos_also_ignores_the_models_extra_eos_ids():
    """A generation config may list several EOS ids: ignore_eos ignores all of them, while
    explicit stop_token_ids still stop (as in HF/vLLM)."""
    eng = Engine(model="dummy:tiny", device="cpu")
    eos = eng.eos_token_id
    eng._eos_ids = (eos, 7, 9)  # as loaded from a multi-EOS generation config
    ignoring = eng.add_request([1, 2], SamplingParams(ignore_eos=True, stop_token_ids=[5]))
    honoring = eng.add_request([1, 2], SamplingParams(stop_token_ids=[5]))
    reqs = eng.scheduler.requests
    assert reqs[ignoring].stop_set == frozenset({5})
    assert reqs[honoring].stop_set == frozenset({5, 7, 9, eos})
