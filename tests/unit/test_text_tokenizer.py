"""The HF-compatible ``Tokenizer`` against transformers' own tokenizer on the same checkpoint
files (the oracle): ``encode`` (with and without special tokens), ``__call__``, ``decode``,
``convert_ids_to_tokens``, special tokens and ``apply_chat_template`` (text and ids) for a
byte-level BPE with a ChatML template and a byte-fallback SentencePiece BPE with a Llama-2
template; and the named errors of bad inputs and failing templates."""

from __future__ import annotations

import pytest
from text_checkpoints import write_tokenizer_checkpoint

from layerzero_serve.errors import ValidationError
from layerzero_serve.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "héllo € 中文 Paris! 🙂",
    "  spaces  and\nnew lines\t",
    "<s> a literal marker </s>",
    "",
]
# a classic template-injection escape: the sandbox refuses it (raised, never rendered)
SANDBOX_ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "Sure? 中文"},
]


@pytest.fixture(scope="module", params=["chatml", "llama2"])
def pair(request, tmp_path_factory):
    path = write_tokenizer_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


def test_encode_decode_and_special_tokens_match_transformers(pair):
    ours, hf = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == hf.encode(
                text, add_special_tokens=special
            )
        ids = ours.encode(text)
        assert ours(text)["input_ids"] == hf(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip
            )
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert ours([TEXTS[0], TEXTS[1]])["input_ids"] == hf([TEXTS[0], TEXTS[1]])["input_ids"]
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, name) == getattr(hf, name)
        assert getattr(ours, f"{name}_id") == getattr(hf, f"{name}_id")
    assert ours.all_special_ids == hf.all_special_ids
    assert ours.vocab_size == hf.vocab_size and len(ours) == len(hf)
    assert ours.get_vocab() == hf.get_vocab()
    assert ours.chat_template == hf.chat_template


def test_apply_chat_template_matches_transformers(pair):
    ours, hf = pair
    chats = [CHAT, CHAT[1:2], CHAT[:2]]
    for chat in chats:
        for gen in (False, True):
            text = ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            ids = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert ids == hf.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
    batch = ours.apply_chat_template(chats, return_dict=True)
    assert [b["input_ids"] for b in batch] == [ours.apply_chat_template(c) for c in chats]
    # a template given per call, with extra variables and the helpers HF templates use
    tpl = "{{ greeting }}{% for m in messages %}{{ m.content | tojson }}{% endfor %}"
    kw = {"greeting": "hi <&>"}
    assert ours.apply_chat_template(
        CHAT[:2], chat_template=tpl, tokenize=False, **kw
    ) == hf.apply_chat_template(CHAT[:2], chat_template=tpl, tokenize=False, **kw)


def test_bad_inputs_and_templates_raise_named_errors(pair):
    ours, _ = pair
    cases = [
        (lambda: ours.encode(b"bytes"), "text"),
        (lambda: ours.decode([1, -1]), "token_ids"),
        (lambda: ours.decode("abc"), "token_ids"),
        (lambda: ours.apply_chat_template("hello"), "conversation"),
        (lambda: ours.apply_chat_template([1, 2]), "conversation[0]"),
        (lambda: ours.apply_chat_template(CHAT, chat_template="{% for %}"), "chat_template"),
        (
            lambda: ours.apply_chat_template(CHAT, chat_template="{{ raise_exception('no') }}"),
            "conversation",
        ),
        (lambda: ours.apply_chat_template(CHAT, chat_template=SANDBOX_ESCAPE), None),
    ]
    for call, param in cases:
        with pytest.raises(ValidationError) as ei:
            call()
        if param is not None:
            assert ei.value.param == param, ei.value
    with pytest.raises(ValidationError, match="no"):  # the template's own message is kept
        ours.apply_chat_template(CHAT, chat_template="{{ raise_exception('no way') }}")
    if ours.chat_template and "raise_exception" in ours.chat_template:  # llama2: roles alternate
        with pytest.raises(ValidationError, match="alternate"):
            ours.apply_chat_template([CHAT[1], CHAT[1]])
