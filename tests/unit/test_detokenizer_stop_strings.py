"""Incremental detokenization and stop strings, against whole-output oracles.

* The deltas of ``IncrementalDetokenizer`` (steps of 1 to 4 tokens, as speculative decoding
  gives) concatenate to exactly ``decode(ids)`` of the whole output, for random id sequences
  (special tokens, broken UTF-8 byte sequences and byte-fallback runs included) and for real
  multi-byte text on a byte-level BPE and a byte-fallback SentencePiece BPE, with and without
  ``skip_special_tokens``; on valid text no delta ever holds a U+FFFD; each step decodes a
  window of a few tokens, not the output.
* ``StopStringMatcher`` fed text in random chunks equals a naive rescan of the whole text
  after every chunk: same stop string, same truncated text (with and without
  ``include_stop_str_in_output``); everything it streamed is a prefix of that text.
"""

from __future__ import annotations

import random

import pytest
from text_checkpoints import CORPUS, write_tokenizer_checkpoint

from layerzero_serve.detokenizer import WINDOW_TOKENS, IncrementalDetokenizer
from layerzero_serve.errors import ValidationError
from layerzero_serve.stop_strings import StopStringMatcher
from layerzero_serve.tokenizer import Tokenizer

REAL = CORPUS + ["héllo € 中文 Paris 🙂 naïve ☃ — ok", "日本語のテキスト, ещё раз"]


@pytest.fixture(scope="module", params=["chatml", "llama2"])
def tok(request, tmp_path_factory):
    return Tokenizer.from_pretrained(
        write_tokenizer_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    )


def _stream(tok, ids, skip, rng) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas, at = [], 0
    while at < len(ids):
        n = rng.randint(1, 4)
        deltas.append(detok.step(ids[at : at + n]))
        at += n
    deltas.append(detok.flush())
    assert detok.text_len == sum(map(len, deltas))
    return deltas


def test_deltas_concatenate_to_the_full_decode(tok):
    rng = random.Random(0)
    vocab = len(tok)
    special = sorted(tok.special_token_ids)
    cases = []
    for _ in range(150):  # random ids: any token, runs of byte tokens, special tokens
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        if tok.byte_fallback_ids and rng.random() < 0.5:
            at = rng.randrange(len(ids))
            ids[at:at] = rng.sample(sorted(tok.byte_fallback_ids), 3)
        if rng.random() < 0.3:
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
        cases.append(ids)
    for text in REAL:
        cases.append(tok.encode(text, add_special_tokens=False))
    for ids in cases:
        for skip in (True, False):
            deltas = _stream(tok, ids, skip, rng)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), ids


def test_valid_text_never_streams_a_replacement_character(tok):
    rng = random.Random(1)
    for text in REAL:
        ids = tok.encode(text, add_special_tokens=False)
        deltas = _stream(tok, ids, True, rng)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
        assert all("\ufffd" not in d for d in deltas)


def test_each_step_decodes_a_short_window(tok):
    calls: list[int] = []
    backend = tok.backend_tokenizer

    class Spy:
        byte_fallback_ids = tok.byte_fallback_ids
        special_token_ids = tok.special_token_ids

        class backend_tokenizer:  # noqa: N801 - stands in for the tokenizers object
            @staticmethod
            def decode(ids, skip_special_tokens):
                calls.append(len(ids))
                return backend.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tok.encode(" ".join(CORPUS * 8), add_special_tokens=False)
    detok = IncrementalDetokenizer(Spy, skip_special_tokens=True)
    text = "".join(detok.step([t]) for t in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 100 and max(calls) <= WINDOW_TOKENS + 2
    assert len(calls) <= 1.5 * len(ids)  # about one decode per step


def _naive(chunks: list[str], stops: list[str], include: bool) -> tuple[str, str | None]:
    """Rescan the whole text after every chunk; cut at the earliest match."""
    text = ""
    for chunk in chunks:
        text += chunk
        found = [(text.find(s), k, s) for k, s in enumerate(stops) if s in text]
        if found:
            at, _, s = min(found)
            return text[: at + (len(s) if include else 0)], s
    return text, None


def test_stop_strings_match_a_naive_rescan():
    rng = random.Random(2)
    alphabet = "ab\n€ "
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
            for _ in range(rng.randint(1, 3))
        ]
        chunks, at = [], 0
        while at < len(text):
            n = rng.randint(0, 6)
            chunks.append(text[at : at + n])
            at += n
        for include in (False, True):
            m = StopStringMatcher(stops, include_stop_str_in_output=include)
            out, hit = "", None
            for chunk in chunks:
                emit, hit = m.feed(chunk)
                out += emit
                if hit is not None:
                    break
            if hit is None:
                out += m.flush()
            want, want_hit = _naive(chunks, stops, include)
            assert (out, hit) == (want, want_hit), (text, stops, chunks, include)


def test_stop_strings_before_min_tokens_only_record_text():
    m = StopStringMatcher(["ab"])
    assert m.feed("xa", check=False) == ("x", None)
    assert m.feed("b", check=False) == ("a", None)  # "ab" completed while unchecked
    assert m.feed("cab") == ("bc", "ab")  # the first match ending in checked text
    with pytest.raises(ValidationError):
        StopStringMatcher([""])
