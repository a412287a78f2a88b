"""Shared vocabulary of the runtime: requests (from ``layerzero_serve.request``), the
scheduler's per-step output, the runner's per-step tokens, and the per-request outputs.

A leaf module: imports nothing from the rest of the package but ``errors`` and ``request``, so
the scheduler, the KV cache and the runner can all depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from layerzero_serve.request import (  # noqa: F401  (re-exported: the shared vocabulary)
    FINISH_REASONS,
    Request,
    RequestDescription,
    RequestStatus,
    check_token_ids,
)


@dataclass(slots=True)
class ScheduledChunk:
    """Work for one request in one step: compute KV for tokens
    ``all_token_ids[start : start + num_tokens]`` (positions ``start ..``). A convenience view
    of one row of ``SchedulerOutput``; the hot path reads the columns directly."""

    request: Request
    start: int
    num_tokens: int
    block_ids: list[int]  # the request's whole block table (live list: do not mutate)
    samples: bool  # True when this chunk reaches the end of the known tokens: sample one


@dataclass(slots=True)
class SchedulerOutput:
    """What the scheduler decided for one step, column by column (row i = one request).

    Rows list running requests first (decodes and continuing prefills, in queue order), then
    newly admitted ones. Row i computes KV for positions ``starts[i] .. starts[i] +
    num_scheduled[i] - 1`` of ``requests[i].all_token_ids + drafts[id]`` and samples when
    that reaches the end of the known tokens. ``blocks_to_copy`` holds (src, dst) block pairs
    from copy-on-write forks to copy in the KV tensors before this step's forward.

    CUDA graphs: a host object; the runner turns it into device inputs outside capture.
    """

    step_id: int
    requests: list[Request]
    starts: list[int]
    num_scheduled: list[int]
    block_ids: list[list[int]]  # live block tables (read only)
    num_batched_tokens: int
    blocks_to_copy: list[tuple[int, int]]
    preempted_ids: list[str]
    # the KV manager's ``table_edits`` when the step was scheduled (-1: unknown): lets a runner
    # keep block-table rows from the previous step while only appends happened
    table_edits: int = -1
    # request id -> the drafts this step verifies after the request's last token (only rows
    # that verify; what the scheduler kept of the drafts given to ``schedule``)
    drafts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    def is_pure_decode(self) -> bool:
        """Every row computes one token and samples (the steps the decode graphs run)."""
        return all(
            n == 1 and s + 1 == len(r.all_token_ids)
            for r, s, n in zip(self.requests, self.starts, self.num_scheduled, strict=True)
        )

    def samples(self, i: int) -> bool:
        """Whether row i reaches the end of its request's known tokens (so it samples)."""
        return self.starts[i] + self.num_scheduled[i] >= len(self.requests[i].all_token_ids)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        """Row views (allocates; meant for tests, tools and examples, not the hot path)."""
        return [
            ScheduledChunk(r, s, n, b, s + n >= len(r.all_token_ids))
            for r, s, n, b in zip(
                self.requests, self.starts, self.num_scheduled, self.block_ids, strict=True
            )
        ]


@dataclass(slots=True)
class TokenLogprob:
    """The logprob of one chosen token (sampled or prompt) and the ``n`` most likely tokens of
    the same distribution (``SamplingParams.logprobs`` / ``prompt_logprobs`` = n)."""

    token_id: int
    logprob: float
    rank: int  # 1 + the number of tokens strictly more likely than ``token_id``
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class RequestOutput:
    """Streaming-friendly result of one step for one request.

    ``logprobs`` (when the request asked for them): one entry per token of ``new_token_ids``.
    ``prompt_logprobs``: once, with the first output token: one entry per prompt token, the
    first ``None`` (nothing predicts it).
    ``new_text``: the text these tokens add (None when the request is not detokenized: no
    tokenizer, or ``detokenize=False``); text that may still change (an incomplete character,
    a possible stop string) comes in a later step. ``stop_reason``: the stop string or stop
    token id that ended it (None otherwise, EOS included).

    CUDA graphs: a host object.
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_output_tokens: int
    detail: str = ""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    new_text: str | None = None
    stop_reason: int | str | None = None


class StepOutputs(Sequence[RequestOutput]):
    """The ``RequestOutput`` of every request that produced tokens or ended in a step.

    Stored as plain tuples and turned into ``RequestOutput`` objects only when read, so a step
    with hundreds of decodes costs no object construction unless someone looks.
    """

    __slots__ = ("_rows",)

    def __init__(self, rows: list[tuple]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [RequestOutput(*r) for r in self._rows[i]]
        return RequestOutput(*self._rows[i])

    def __iter__(self) -> Iterator[RequestOutput]:
        return (RequestOutput(*r) for r in self._rows)

    def __repr__(self) -> str:
        return f"StepOutputs({list(self)!r})"


class StepTokens(list):
    """The runner's result: ``tokens[i]`` are row i's new token ids (a list of lists, as the
    scheduler's ``update`` takes them), plus per-row extras of the step: ``failed`` (row ->
    detail; the row's sampling failed and its request must end in error), ``logprobs`` (row ->
    TokenLogprob of its token) and ``prompt_logprobs`` (row -> [(prompt position,
    TokenLogprob)])."""

    __slots__ = ("failed", "logprobs", "prompt_logprobs")

    def __init__(self, rows=()) -> None:
        super().__init__(rows)
        self.failed: dict[int, str] = {}
        self.logprobs: dict[int, TokenLogprob] = {}
        self.prompt_logprobs: dict[int, list[tuple[int, TokenLogprob]]] = {}
