"""Shared vocabulary of the runtime: requests, statuses and the scheduler's per-step output.

A leaf module: imports nothing from the rest of the package except errors, so the scheduler,
the KV cache and the runner can all depend on it.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from layerzero_serve.sampling.params import SamplingParams


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

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

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
    ``all_token_ids[start : start + num_tokens]`` (positions ``start ..``)."""

    request: Request
    start: int
    num_tokens: int
    block_ids: list[int]  # the request's whole block table (live list: do not mutate)
    samples: bool  # True when this chunk reaches the end of the known tokens: sample one


@dataclass(slots=True)
class SchedulerOutput:
    """What the scheduler decided for one step; the runner turns it into a ForwardBatch.

    ``chunks`` lists decode requests first (one token each, in running order), then prefill
    chunks. ``blocks_to_copy`` holds (src, dst) block pairs from copy-on-write forks that must be
    copied in the KV tensors before this step's forward.
    """

    step_id: int
    chunks: list[ScheduledChunk]
    num_batched_tokens: int
    blocks_to_copy: list[tuple[int, int]]
    preempted_ids: list[str]
    rejected: list[Request]

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class RequestOutput:
    """Streaming-friendly result of one step for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_output_tokens: int
    detail: str = ""
