"""The engine's per-request output state: streaming text, stop strings and ``stop_reason``.

One entry per sequence that needs any of it (``detokenize`` with a tokenizer, stop strings, or
stop token ids): requests with none of these cost one dict lookup per step only while some
other request has an entry, and nothing otherwise. ``apply`` runs on each step's outputs after
the scheduler's update:

* ``new_text``: the step's text delta (the incremental detokenizer, then the stop-string hold
  back); at the end, whatever was held back. A stop token's own text is left out unless
  ``include_stop_str_in_output`` (as in vLLM).
* a stop string found in the text ends the sequence there: ``finished``, ``finish_reason
  "stop"``, ``stop_reason`` = the string. The scheduler still runs it, so it is aborted there
  (its KV blocks go back at once) and the abort's own report, one step later, is dropped.
* ``stop_reason`` = the stop token id when a ``stop_token_ids`` entry ended it (None for EOS).

Registered with the engine's releases (``release``); host only.
"""

from __future__ import annotations

from layerzero_serve.detokenizer import IncrementalDetokenizer
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.stop_strings import StopStringMatcher
from layerzero_serve.types import RequestOutput

__all__ = ["OutputProcessor"]


class _Entry:
    __slots__ = ("detok", "stops", "min_tokens", "stop_ids", "include_stop")

    def __init__(self, params: SamplingParams, tokenizer) -> None:
        text = tokenizer is not None and params.detokenize
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if text else None
        self.include_stop = params.include_stop_str_in_output
        self.stops = (
            StopStringMatcher(params.stop, self.include_stop) if text and params.stop else None
        )
        self.min_tokens = params.min_tokens
        self.stop_ids = frozenset(params.stop_token_ids)


class OutputProcessor:
    """Text and stop state of the engine's sequences (see the module docstring)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self._entries: dict[str, _Entry] = {}
        self._ended: set[str] = set()  # stopped here; the scheduler's abort report is pending

    def __bool__(self) -> bool:
        return bool(self._entries) or bool(self._ended)

    @staticmethod
    def needs_entry(params: SamplingParams, tokenizer) -> bool:
        return (tokenizer is not None and params.detokenize) or bool(params.stop_token_ids)

    def add(self, name: str, params: SamplingParams, tokenizer) -> None:
        self._entries[name] = _Entry(params, tokenizer)

    def release(self, name: str) -> None:
        self._entries.pop(name, None)

    def apply(self, outputs: list[RequestOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Fill in this step's text and stop reasons; returns the outputs to report and the
        names whose late abort report was dropped (their end was reported earlier)."""
        entries, ended = self._entries, self._ended
        kept: list[RequestOutput] = []
        late: list[str] = []
        for o in outputs:
            name = o.request_id
            if name in ended:
                ended.discard(name)
                late.append(name)
                continue
            entry = entries.get(name)
            if entry is not None:
                self._process(entry, o)
            kept.append(o)
        return kept, late

    def _process(self, entry: _Entry, o: RequestOutput) -> None:
        ids = o.new_token_ids
        by_token = o.finished and o.finish_reason == "stop" and bool(ids)
        if by_token and ids[-1] in entry.stop_ids:
            o.stop_reason = ids[-1]
        detok = entry.detok
        if detok is None:
            return
        if by_token and not entry.include_stop:
            ids = ids[:-1]  # the EOS / stop token's own text stays out of the output
        text = detok.step(ids) if ids else ""
        if o.finished:
            text += detok.flush()
        stops = entry.stops
        if stops is not None:
            text, hit = stops.feed(text, check=o.num_output_tokens > entry.min_tokens)
            if hit is not None:
                if not o.finished:  # the scheduler still runs it: end it there too
                    self.scheduler.abort(o.request_id)
                    self._ended.add(o.request_id)
                    o.finished = True
                o.finish_reason, o.stop_reason = "stop", hit
            elif o.finished:
                text += stops.flush()
        o.new_text = text
