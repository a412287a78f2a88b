"""Shared vocabulary of the runtime: requests, statuses and the scheduler's per-step output.

A leaf module: imports nothing from the rest of the package except errors, so the scheduler,
the KV cache and the runner can all depend on it.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from layerzero_serve.errors import ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from layerzero_serve.sampling._params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # EOS or a stop token
    FINISHED_LENGTH = 4  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 5
    FINISHED_REJECTED = 6  # can never fit: prompt too long for the pool or max_model_len
    FINISHED_ERROR = 7  # the request's own computation failed (e.g. NaN logits)

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_REJECTED: "rejected",
    RequestStatus.FINISHED_ERROR: "error",
}

_request_counter = itertools.count()


@dataclass(slots=True, eq=False)
class Request:
    """One sequence being generated; owned by the scheduler.

    ``all_token_ids`` is the prompt followed by the output. ``num_computed_tokens`` counts the
    leading tokens whose KV is in the cache; it catches up with ``num_tokens`` through prefill,
    chunked prefill, prefix hits, recompute after preemption and speculative verification alike.

    CUDA graphs: a host object.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    eos_token_id: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    priority: int = 0  # lower value = more important (served first, preempted last)
    cache_salt: str | None = None
    adapter_id: int | None = None
    sampling_params: SamplingParams | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    # ---- state below is owned by the scheduler / KV cache manager ----
    arrival_seq: int = field(default_factory=lambda: next(_request_counter))
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # tokens served from the prefix cache at the last admission
    status: RequestStatus = RequestStatus.WAITING
    block_hashes: list = field(default_factory=list)  # hash of each full block, in order
    num_preemptions: int = 0
    finish_detail: str = ""
    spec_token_ids: list[int] = field(default_factory=list)
    # Owned by the KV cache manager, mirrored here for the scheduler's decode fast path: the
    # live block table, and how many token slots it may write without asking for more.
    kv_block_ids: list[int] = field(default_factory=list)
    kv_capacity: int = 0
    # Derived at admission by the scheduler so the per-token stop check is two lookups.
    stop_set: frozenset[int] = frozenset()
    stop_len: int = 0  # total length (prompt + output) at which the request ends
    # The sampling seed of this sequence (n > 1 siblings get distinct ones); None = the
    # params' seed, or one drawn by the sampler when that is None too.
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            try:
                self.all_token_ids = list(self.prompt_token_ids)
            except TypeError:  # not iterable (an int, a 0-d array): name it, as add_request would
                raise ValidationError(
                    "prompt_token_ids", self.prompt_token_ids, "a sequence of token ids"
                ) from None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)


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
    num_scheduled[i] - 1`` of ``requests[i].all_token_ids + spec_token_ids`` and samples when
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
