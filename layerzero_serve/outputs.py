"""What ``LLM.generate`` / ``LLM.chat`` return: one :class:`GenerationResult` per prompt, shaped
like vLLM's offline ``RequestOutput`` (``request_id``, ``prompt``, ``prompt_token_ids``,
``outputs[i]`` with ``index``, ``text``, ``token_ids``, ``cumulative_logprob``, ``logprobs``,
``finish_reason``, ``stop_reason``, ``finished()``), so code written for vLLM's offline API
reads it unchanged. ``CompletionOutput`` is an alias of :class:`Completion`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerzero_serve.types import RequestOutput, TokenLogprob

__all__ = ["Completion", "CompletionOutput", "GenerationResult"]


@dataclass(slots=True)
class Completion:
    """One sample of a prompt.

    ``index``: which of the ``n`` samples; ``text``: the decoded output (None when it was not
    detokenized: no tokenizer, or ``detokenize=False``); ``token_ids``; ``logprobs``: one
    ``TokenLogprob`` per token when requested, and ``cumulative_logprob`` their sum (None
    otherwise); ``finish_reason`` (``"stop"``, ``"length"``, ``"abort"``, ``"error"``...);
    ``stop_reason``: the stop string or stop token id that ended it (None for EOS or
    another reason).

    CUDA graphs: a host object.
    """

    index: int = 0
    text: str | None = None
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """Whether this sample has ended (a method, as in vLLM's ``CompletionOutput``)."""
        return self.finish_reason is not None

    def add(self, o: RequestOutput) -> None:
        """Fold one step's engine output for this sample in."""
        self.token_ids.extend(o.new_token_ids)
        if o.new_text is not None:
            self.text = o.new_text if self.text is None else self.text + o.new_text
        if o.logprobs is not None:
            if self.logprobs is None:
                self.logprobs, self.cumulative_logprob = [], 0.0
            self.logprobs.extend(o.logprobs)
            self.cumulative_logprob += sum(lp.logprob for lp in o.logprobs)
        if o.finished:
            self.finish_reason = o.finish_reason
            self.stop_reason = o.stop_reason


CompletionOutput = Completion  # vLLM's name


@dataclass(slots=True)
class GenerationResult:
    """Everything ``generate`` returns for one prompt (``outputs`` has ``n`` samples).

    ``prompt`` is the prompt's text (for ``chat``: the rendered conversation; None for a
    token-id prompt), ``finished`` whether every sample has ended. Timing fields are seconds
    from ``time.monotonic()``: arrival, first token, finish.

    CUDA graphs: a host object.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion]
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when requested
    finished: bool = False

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time
