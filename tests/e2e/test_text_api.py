"""The text API end to end on the embedded default model (random weights: gibberish, but real
byte-level BPE text), with a copy of it that has a chat template and a generation config:

* stop strings cut the text where a whole-output search finds them (across token
  boundaries), end the request with ``stop_reason``, free its KV blocks, and leave the other
  requests of the batch token-identical to a run without them; stop token ids likewise;
* the engine streams text deltas that concatenate to the tokenizer's decode of the output;
  prompts as str / ids / ``{"prompt"}`` / ``{"prompt_token_ids"}`` agree, bad ones are named;
* ``LLM.chat`` feeds the ids transformers' ``apply_chat_template`` gives, and names bad
  messages and failing templates; ``generation_config.json`` supplies the defaults.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from layerzero_serve import LLM, SamplingParams
from layerzero_serve.engine import Engine
from layerzero_serve.errors import ValidationError

transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('this model has no tools') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
EXTRA_EOS = 7  # generation_config.json's second EOS id
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Paris is the capital", "Once upon a time"]


@pytest.fixture(scope="module")
def chat_dir(default_model_dir, tmp_path_factory):
    """The default model plus a chat template and a generation config."""
    d = tmp_path_factory.mktemp("chat-model")
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(default_model_dir / f, d / f)
    cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    cfg.update(chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    gen = {"eos_token_id": [2, EXTRA_EOS], "temperature": 0.0, "top_k": 5, "max_new_tokens": 6}
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


@pytest.fixture(scope="module")
def llm(chat_dir):
    return LLM(chat_dir, device="cpu", max_model_len=128, cpu_threads=1)


def _boundary_stop(llm, ids: list[int], text: str) -> str:
    """A 3-character stop string of ``text`` that spans a token boundary."""
    for k in range(3, len(ids)):
        b = len(llm.tokenizer.decode(ids[:k], skip_special_tokens=True))
        s = text[b - 1 : b + 2]
        if len(s) == 3 and "\ufffd" not in s and b > 2:
            return s
    pytest.fail("no stop string candidate")


def test_stop_strings_and_stop_ids_end_only_their_request(llm):
    base = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    ids, text = base[0].token_ids, base[0].text
    assert text == llm.tokenizer.decode(ids, skip_special_tokens=True)
    stop = _boundary_stop(llm, ids, text)
    cut = text.find(stop)
    for include in (False, True):
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=24,
            ignore_eos=True,
            stop=["never-there", stop],
            include_stop_str_in_output=include,
        )
        got = llm.generate(PROMPTS, [sp, GREEDY, GREEDY], use_tqdm=False)
        c = got[0].outputs[0]
        assert c.text == text[: cut + (len(stop) if include else 0)]
        assert (c.finish_reason, c.stop_reason, c.finished()) == ("stop", stop, True)
        assert len(c.token_ids) < len(ids) and c.token_ids == ids[: len(c.token_ids)]
        for r, b in zip(got[1:], base[1:], strict=True):  # batch mates unaffected
            assert (r.token_ids, r.text, r.finish_reason) == (b.token_ids, b.text, "length")
        assert llm.engine.stats()["kv_cache"]["used"] == 0  # the stopped request's blocks too
        assert not llm.engine.has_unfinished() and not llm.engine.scheduler.requests
    at = next(k for k in range(3, len(ids)) if ids[k] not in ids[:k])
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[ids[at]])
    c = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0].outputs[0]
    assert (c.token_ids, c.finish_reason, c.stop_reason) == (ids[: at + 1], "stop", ids[at])
    assert c.text == llm.tokenizer.decode(ids[:at], skip_special_tokens=True)  # stop id left out


def test_engine_streams_text_and_takes_every_prompt_shape(llm):
    eng, tok = llm.engine, llm.tokenizer
    ids = tok.encode(PROMPTS[1])
    shapes = [PROMPTS[1], ids, {"prompt": PROMPTS[1]}, {"prompt_token_ids": ids}]
    names = [eng.add_request(p, GREEDY) for p in shapes]
    sp = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True)
    names.append(eng.add_request(PROMPTS[2], sp))
    toks: dict[str, list[int]] = {}
    text: dict[str, str] = {}
    while eng.has_unfinished():
        for o in eng.step():
            toks.setdefault(o.request_id, []).extend(o.new_token_ids)
            text[o.request_id] = text.get(o.request_id, "") + o.new_text
    assert all(toks[n] == toks[names[0]] for n in names[:4])
    for name, out in toks.items():
        assert text[name] == tok.decode(out, skip_special_tokens=True)
    bad = [
        (b"bytes", "prompt"),
        ({"prompt": 3}, "prompt.prompt"),
        ({"prompt_token_ids": "abc"}, "prompt.prompt_token_ids"),
        ({"text": "a"}, "prompt"),
        ({"prompt_token_ids": [1, 10**6]}, "prompt_token_ids[1]"),
    ]
    for prompt, param in bad:
        with pytest.raises(ValidationError) as ei:
            eng.add_request(prompt, GREEDY)
        assert ei.value.param == param
    with pytest.raises(ValidationError) as ei:
        llm.generate([PROMPTS[0], {"prompt": None}], GREEDY, use_tqdm=False)
    assert ei.value.param == "prompts[1].prompt" and not eng.has_unfinished()


def test_no_tokenizer_rejects_text_and_stop_strings():
    eng = Engine("dummy:tiny", device="cpu", cpu_threads=1)
    for prompt, sp, param in [("text", None, "prompt"), ([1, 2], SamplingParams(stop="x"), "stop")]:
        with pytest.raises(ValidationError) as ei:
            eng.add_request(prompt, sp)
        assert ei.value.param == param
    eng.add_request([1, 2], SamplingParams(max_tokens=3, ignore_eos=True))
    outs = [o for _ in range(5) for o in eng.step()]
    assert all(o.new_text is None for o in outs) and eng.tokenizer is None


def test_chat_matches_transformers_and_names_bad_messages(llm, chat_dir, default_model_dir):
    hf = transformers.AutoTokenizer.from_pretrained(chat_dir)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    res = llm.chat(conv, GREEDY, use_tqdm=False)[0]
    assert res.prompt_token_ids == hf.apply_chat_template(
        conv, add_generation_prompt=True, return_dict=False
    )
    assert res.prompt == hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert res.token_ids == llm.generate(res.prompt_token_ids, GREEDY, use_tqdm=False)[0].token_ids
    two = llm.chat([conv, conv[1:]], GREEDY, use_tqdm=False)
    assert [r.prompt_token_ids for r in two] == [
        hf.apply_chat_template(c, add_generation_prompt=True, return_dict=False)
        for c in (conv, conv[1:])
    ]
    bad = [
        ([{"content": "x"}], "messages[0].role"),
        ([conv[0], {"role": "user"}], "messages[1].content"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "tool", "content": "x"}], "messages"),  # the template raises
        ([conv, [{"role": "robot", "content": "x"}]], "messages[1][0].role"),
        ("hello", "messages"),
    ]
    for messages, param in bad:
        with pytest.raises(ValidationError) as ei:
            llm.chat(messages, GREEDY, use_tqdm=False)
        assert ei.value.param == param, (messages, ei.value)
    with pytest.raises(ValidationError, match="no tools"):
        llm.chat([{"role": "tool", "content": "x"}], use_tqdm=False)
    with pytest.raises(ValidationError) as ei:
        llm.chat(conv, chat_template="{% if %}", use_tqdm=False)
    assert ei.value.param == "chat_template"
    plain = LLM(default_model_dir, device="cpu", max_model_len=64, cpu_threads=1)  # no template
    with pytest.raises(ValidationError) as ei:
        plain.chat(conv, use_tqdm=False)
    assert ei.value.param == "chat_template"
    assert not llm.engine.has_unfinished()


def test_generation_config_supplies_defaults(chat_dir, caplog):
    with caplog.at_level(logging.INFO, logger="layerzero_serve"):
        llm = LLM(chat_dir, device="cpu", max_model_len=64, cpu_threads=1)
    said = [r for r in caplog.records if "generation_config.json" in r.getMessage()]
    assert len(said) == 1 and "temperature=0.0" in said[0].getMessage()
    assert EXTRA_EOS in llm.engine._eos_ids and 2 in llm.engine._eos_ids
    default = llm.generate(PROMPTS[0], use_tqdm=False)[0]
    same = SamplingParams(temperature=0.0, top_k=5, max_tokens=6)
    assert default.token_ids == llm.generate(PROMPTS[0], same, use_tqdm=False)[0].token_ids
    assert len(default.token_ids) <= 6
    assert llm.engine.default_sampling_params == same
    assert llm.get_tokenizer() is llm.tokenizer and llm.tokenizer.chat_template == CHAT_TEMPLATE
