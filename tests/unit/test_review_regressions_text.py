"""Regressions found by review of the text API and the GGUF loader: a seeded detokenizer keeps
a SentencePiece output's leading space, out-of-vocabulary EOS ids are dropped (not fatal),
chat_template_kwargs are type-checked and win over same-named variables, and a GGUF's
sampling defaults of 0 do not make the file unloadable."""

from __future__ import annotations

import pytest
from gguf_tiny import tiny_hf_model, write_gguf
from text_checkpoints import write_tokenizer_checkpoint

from layerzero_serve._generation_defaults import generation_eos_ids
from layerzero_serve._models.gguf import gguf_text_assets
from layerzero_serve.detokenizer import IncrementalDetokenizer
from layerzero_serve.errors import ValidationError
from layerzero_serve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return Tokenizer.from_pretrained(
        write_tokenizer_checkpoint("llama2", tmp_path_factory.mktemp("spm"))
    )


def test_the_prompt_gives_the_output_its_leading_space(spm):
    prompt = spm.encode("a b", add_special_tokens=False)
    full = spm.encode("a b c c c", add_special_tokens=False)
    assert full[: len(prompt)] == prompt
    out = full[len(prompt) :]
    detok = IncrementalDetokenizer(spm, prompt_ids=prompt)
    text = "".join(detok.step([t]) for t in out) + detok.flush()
    expected = spm.decode(full)[len(spm.decode(prompt)) :]  # the output in the prompt's context
    assert text == expected and text.startswith(" ")
    plain = IncrementalDetokenizer(spm)  # without a prompt: the decoder strips it
    assert "".join(plain.step([t]) for t in out) + plain.flush() == spm.decode(out)


def test_out_of_vocabulary_eos_ids_are_dropped_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="layerzero_serve"):
        assert generation_eos_ids({"eos_token_id": [2, 600]}, 2, None, vocab_size=582) == (2,)
    assert "600" in caplog.text


def test_chat_template_kwargs_are_checked_and_win(spm):
    chat = [{"role": "user", "content": "hi"}]
    base = spm.apply_chat_template(chat, tokenize=False)
    got = spm.apply_chat_template(chat, tokenize=False, bos_token="<X>")
    assert got == base.replace("<s>", "<X>") and got != base
    with pytest.raises(ValidationError, match="chat_template_kwargs"):
        spm.apply_chat_template(chat, tokenize=False, messages=[])


def test_gguf_sampling_defaults_of_zero_still_load(tmp_path):
    hf = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "m.gguf", hf, metadata={"general.sampling.min_p": 0.0,
                                                         "general.sampling.temp": 0.0})  # fmt: skip
    assets = gguf_text_assets(path)
    assert assets.generation_config.get("min_p") == 0.0
    assert assets.generation_config.get("temperature") == 0.0


def test_openai_style_messages_pass_the_conversation_check():
    from layerzero_serve._chat_template import check_conversation

    ok = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "ipython", "content": "42"},
    ]
    assert check_conversation(ok) == ok
    for bad, field in (
        ([{"role": "assistant", "content": None}], "messages[0].content"),  # no tool_calls
        ([{"role": "user", "content": [3]}], "messages[0].content"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ):
        with pytest.raises(ValidationError, match=field.replace("[", r"\[").replace("]", r"\]")):
            check_conversation(bad)
