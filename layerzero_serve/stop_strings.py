"""Stop strings, matched on a request's text as it streams in, across token boundaries.

Each step searches only the step's new text plus the last ``max_stop_len - 1`` characters
before it (a stop string that ends in the new text starts there at the earliest), so the cost
does not grow with the output. Without ``include_stop_str_in_output`` the last
``max_stop_len - 1`` characters are also held back from the stream until they cannot be the
start of a stop string: the streamed text then never contains text that the stop would cut,
and the deltas concatenate to the final (truncated) text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from layerzero_serve.errors import ValidationError

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """The stop strings of one sequence.

    ``StopStringMatcher(stop, include_stop_str_in_output=False)``. ``feed(text, check=True)
    -> (emit, hit)``: ``text`` is the sequence's newly decoded text; ``emit`` is the text to
    stream now and ``hit`` the stop string found (None if none; the earliest match wins, then
    the first in ``stop`` order). After a hit, ``emit`` ends just before the stop string (just
    after it with ``include_stop_str_in_output``) and the sequence is over. ``check=False``
    (before ``min_tokens``) only records the text. ``flush()`` returns the held-back text when
    the sequence ends otherwise.

    CUDA graphs: host only.
    """

    __slots__ = ("stop", "_include", "_pattern", "_tail_len", "_hold", "_tail", "_held")

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if not stop or not all(isinstance(s, str) and s for s in stop):
            raise ValidationError("stop", stop, "one or more non-empty str")
        self.stop = tuple(stop)
        self._include = include_stop_str_in_output
        self._pattern = re.compile("|".join(map(re.escape, self.stop)))
        self._tail_len = max(map(len, self.stop)) - 1  # chars a new match may start before
        self._hold = 0 if include_stop_str_in_output else self._tail_len
        self._tail = ""  # the last _tail_len characters seen
        self._held = ""  # the last _hold characters seen and not yet emitted

    def feed(self, text: str, check: bool = True) -> tuple[str, str | None]:
        tail = self._tail
        window = tail + text
        if check and text:
            base = len(tail)
            # one regex scan (leftmost match, then the first alternative: the earliest stop,
            # ties in ``stop`` order); only matches that end in the new text count, earlier
            # ones were seen before (or came before min_tokens)
            m = self._pattern.search(window, max(0, base - self._tail_len))
            while m is not None and m.end() <= base:
                m = self._pattern.search(window, m.start() + 1)
            if m is not None:
                hit = m.group()
                end = m.end() if self._include else m.start()
                # the unemitted text is the held suffix of the tail followed by `text`
                emit = window[base - len(self._held) : end]
                self._held = ""
                return emit, hit
        if self._tail_len:
            self._tail = window[-self._tail_len :]
        pending = self._held + text
        if not self._hold:
            return pending, None
        cut = max(0, len(pending) - self._hold)
        self._held = pending[cut:]
        return pending[:cut], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
