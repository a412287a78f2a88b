"""Incremental detokenization: a request's output ids in, step by step, its text out as deltas.

The deltas of a request concatenate to exactly ``decode(output_ids)``. Each step decodes only a
short window of the latest ids, never the whole output:

* ``_text`` is the decode of ``ids[_start:_read]`` (the window already emitted); a step decodes
  ``ids[_start:]`` once and emits what extends ``_text``. Decoding from a window start instead
  of from 0 gives the same characters after it: the window starts at a token where an earlier
  emission ended (a character boundary), and a decoder's start-of-text effects (the leading
  space a SentencePiece decoder strips) apply alike to ``_text`` and to the new text.
* Every few steps the window slides to the previous emission's start (one extra decode), so a
  step decodes a handful of tokens whatever the output's length.
* Text that may still change is held back: a decode ending in U+FFFD (a multi-byte character
  whose remaining bytes are still to come), and, for byte-fallback tokenizers, anything while
  the last token is a ``<0xHH>`` byte token (the ``tokenizers`` ByteFallback decoder decodes a
  run of byte tokens as a whole: a later invalid byte turns the whole run into U+FFFD).
  ``flush()`` at the end emits the rest as it decodes.

Host cost: about one ``tokenizers`` decode of a few ids per request and step (~1-2 us).
"""

from __future__ import annotations

from collections.abc import Sequence

from layerzero_serve.errors import ValidationError

__all__ = ["IncrementalDetokenizer"]

# Slide the window once it spans this many tokens (a slide costs one extra decode).
WINDOW_TOKENS = 6
PROMPT_CONTEXT_TOKENS = 4  # prompt ids the first window starts with (see ``_seed``)
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """One sequence's streaming text.

    ``IncrementalDetokenizer(tokenizer, skip_special_tokens=True, prompt_ids=())``:
    ``tokenizer`` is a ``layerzero_serve.tokenizer.Tokenizer``; ``prompt_ids``, the request's
    prompt, gives the first decode its context (only its last few ids are read).
    ``step(new_ids) -> str`` appends the step's token ids and returns the text they complete
    ("" while held back); ``flush() -> str`` returns what is still held (call it once, when the
    sequence ends). ``text_len`` is the
    number of characters emitted; ``token_ids`` the ids decoded so far: the prompt context
    used, then the output (read only).

    CUDA graphs: host only.
    """

    __slots__ = ("_decode", "_skip", "_bytes", "token_ids", "_start", "_read", "_prev_read")
    __slots__ += ("_text", "text_len", "_skipped")

    def __init__(
        self, tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = ()
    ) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValidationError("tokenizer", type(tokenizer).__name__, "a layerzero Tokenizer")
        if not isinstance(skip_special_tokens, bool):
            raise ValidationError("skip_special_tokens", skip_special_tokens, "a bool")
        self._decode = backend.decode
        self._skip = skip_special_tokens
        self._bytes: frozenset[int] = tokenizer.byte_fallback_ids
        self._skipped = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self.token_ids: list[int] = []
        self._start = 0  # window start (a token where an emission ended)
        self._read = 0  # ids before this are emitted
        self._prev_read = 0  # the read offset before the last emission (the next window start)
        self._text = ""  # decode(ids[_start:_read])
        self.text_len = 0
        self._seed(prompt_ids)

    def _seed(self, prompt_ids: Sequence[int]) -> None:
        """Start the window on the last few prompt ids, so the output is decoded in the prompt's
        context: a SentencePiece decoder strips the leading space of a text's first word, which
        the output's first word must keep (``"a b" + " c"``, not ``"a b" + "c"``). A tail that
        does not end on a whole character (or in a byte run) is not used."""
        tail = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        if not tail:
            return
        text = self._decode(tail, skip_special_tokens=self._skip)
        if not text or text[-1] == _REPLACEMENT or tail[-1] in self._bytes:
            return
        self.token_ids.extend(tail)
        self._read = self._prev_read = len(tail)
        self._text = text

    def step(self, new_ids: Sequence[int]) -> str:
        """Append ``new_ids`` (this step's tokens) and return the new text ("" when none is
        final yet)."""
        ids = self.token_ids
        ids.extend(new_ids)
        if not ids or (self._bytes and self._in_byte_run()):
            return ""  # inside a byte-fallback run: its text is decided when it ends
        text = self._decode(ids[self._start :], skip_special_tokens=self._skip)
        done = len(self._text)
        if len(text) <= done or text[-1] == _REPLACEMENT:
            return ""  # nothing new (skipped special tokens), or an incomplete character
        delta = text[done:]
        self._prev_read, self._read, self._text = self._read, len(ids), text
        self.text_len += len(delta)
        if self._read - self._start > WINDOW_TOKENS:
            self._slide()
        return delta

    def _in_byte_run(self) -> bool:
        """The last token that has text is a ``<0xHH>`` byte token (a skipped special token
        does not end a run: the runs on both sides of it join)."""
        ids, skipped = self.token_ids, self._skipped
        j = len(ids) - 1
        while j >= 0 and ids[j] in skipped:
            j -= 1
        return j >= 0 and ids[j] in self._bytes

    def _slide(self) -> None:
        """Move the window start to where the last emission began (one decode)."""
        start = self._prev_read
        if start <= self._start:
            return
        text = self._decode(self.token_ids[start : self._read], skip_special_tokens=self._skip)
        if text:  # an empty window would lose the start-of-text context of the next token
            self._start, self._text = start, text

    def flush(self) -> str:
        """The text still held back (an incomplete character, a byte-fallback run), decoded as
        it is; the sequence has ended."""
        ids = self.token_ids
        if self._read == len(ids):
            return ""
        text = self._decode(ids[self._start :], skip_special_tokens=self._skip)
        delta = text[len(self._text) :]
        self._prev_read, self._read, self._text = self._read, len(ids), text
        self.text_len += len(delta)
        return delta
