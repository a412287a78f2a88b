"""The engine's per-request output state: streaming text, stop strings and ``stop_reason``.

One entry per sequence that needs any of it (``detokenize`` with a tokenizer, stop strings, or
stop token ids): requests with none of these cost one dict lookup per step only while some
other request has an entry, and nothing otherwise. ``apply`` runs on each step's outputs after
the scheduler's update:

* ``new_text``: the step's text delta (the incremental detokenizer, then the stop-string hold
  back); at the end, whatever was held back. A stop token's own text is left out unless
  ``include_stop_str_in_output`` (as in vLLM).
* a stop string found in the text ends the sequence there: ``finished``, ``finish_reason
  "stop"``, ``stop_reason`` = the string. The scheduler still runs it, so it is ended there
  at once (``Scheduler.end_reported``: its KV blocks go back, its id is free, no later report).
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

    def __init__(self, params: SamplingParams, tokenizer, prompt_ids=()) -> None:
        text = tokenizer is not None and params.detokenize
        self.detok = (
            IncrementalDetokenizer(tokenizer, params.skip_special_tokens, prompt_ids)
            if text
            else None
        )
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

    def __bool__(self) -> bool:
        return bool(self._entries)

    @staticmethod
    def needs_entry(params: SamplingParams, tokenizer) -> bool:
        return (tokenizer is not None and params.detokenize) or bool(params.stop_token_ids)

    def add(self, name: str, params: SamplingParams, tokenizer, prompt_ids=()) -> None:
        """Track ``name``; ``prompt_ids`` give its text the prompt's context (see
        ``IncrementalDetokenizer``)."""
        self._entries[name] = _Entry(params, tokenizer, prompt_ids)

    def release(self, name: str) -> None:
        self._entries.pop(name, None)

    def apply(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Fill in this step's text and stop reasons (in place); returns ``outputs``."""
        entries = self._entries
        for o in outputs:
            entry = entries.get(o.request_id)
            if entry is not None:
                self._process(entry, o)
        return outputs

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
                if not o.finished:  # the scheduler still runs it: end it there, reported here
                    self.scheduler.end_reported(o.request_id, f"stop string {hit!r}")
                    o.finished = True
                o.finish_reason, o.stop_reason = "stop", hit
            elif o.finished:
                text += stops.flush()
        o.new_text = text
