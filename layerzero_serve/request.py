"""A request: its immutable description, and the progress the scheduler owns.

``RequestDescription`` is what was asked for (ids, prompt, sampling parameters, stop set,
priority, salt, seed), created and validated once and never written again. ``Request`` pairs it
with the progress of generating it: the tokens so far, how many have KV in the cache, the
status, and the handle of its block table. The scheduler is the only writer of the progress;
the KV cache manager keeps its own per-request table and writes only ``block_hashes``, its
cache of the request's chained block hashes. Everything else reads.

A leaf module: imports nothing of the package but ``errors``.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

from layerzero_serve.errors import ValidationError, check_int

if TYPE_CHECKING:  # pragma: no cover
    from layerzero_serve.kv_cache.protocol import BlockTable
    from layerzero_serve.sampling import SamplingParams

__all__ = [
    "FINISH_REASONS",
    "Request",
    "RequestDescription",
    "RequestStatus",
    "check_token_ids",
    "stop_set_of",
]

# Token ids, token counts and positions are int32 on the device.
INT32_MAX = (1 << 31) - 1


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


def stop_set_of(
    stop_token_ids: Iterable[int], eos_token_ids: Iterable[int], ignore_eos: bool
) -> frozenset[int]:
    """The token ids that end a sequence: its stop ids, plus every EOS id of the model unless
    ``ignore_eos``. The one definition: the request's ``stop_set``, the sampler's min-tokens
    mask and ``SamplingParams.validate_for_vocab`` all call it. Host only."""
    stops = frozenset(stop_token_ids)
    return stops if ignore_eos else stops | frozenset(eos_token_ids)


def check_token_ids(param: str, ids: object, low: int = 0, high: int = INT32_MAX) -> list[int]:
    """``ids`` as a list of ints in ``[low, high]``, else a ValidationError naming ``param``.
    Host only (O(len(ids)), once per request)."""
    allowed = f"token ids (ints in [{low}, {high}])"
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise ValidationError(param, type(ids).__name__, allowed)
    try:
        items = list(ids)  # once per request
    except TypeError:  # a 0-d array or tensor
        raise ValidationError(param, ids, allowed) from None
    for t in items:
        if type(t) is not int or not low <= t <= high:
            raise ValidationError(param, t, allowed)
    return items


@dataclass(frozen=True, slots=True, eq=False)
class RequestDescription:
    """What a request asks for; immutable, validated on construction (a ValidationError names
    the field): ``request_id`` a str; ``prompt_token_ids`` a non-empty sequence of int token
    ids (kept as the caller's list: read it, never mutate it; ``Scheduler.add_request`` admits
    ids in ``[0, 2**31 - 1]``); ``max_tokens`` in
    ``[1, 2**31 - 1]``; ``eos_token_id`` None or a token id; ``stop_token_ids`` token ids;
    ``eos_token_ids`` further EOS ids of the model (its generation config may list several);
    ``ignore_eos`` a bool; ``priority`` in ``[-(2**31 - 1), 2**31 - 1]`` (lower runs first);
    ``cache_salt`` None or a str; ``adapter_id`` None or an int64; ``seed`` None or the
    sequence's own sampling seed (n > 1 siblings get distinct ones; None: the params' seed);
    ``prompt_leader`` None or the id of a sibling with the same prompt that computes it for
    both (the scheduler defers this request until the leader has prefilled, then forks the
    leader's KV blocks instead of recomputing them).

    ``stop_set`` is derived here, once (:func:`stop_set_of`): the stop ids plus the EOS ids
    unless ``ignore_eos``.
    Every component that stops on a token (the scheduler's update, the sampler's min-tokens
    mask) reads it.

    CUDA graphs: a host object.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    eos_token_id: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    priority: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    cache_salt: str | None = None
    adapter_id: int | None = None
    sampling_params: SamplingParams | None = None
    seed: int | None = None
    prompt_leader: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_seq: int = field(default_factory=lambda: next(_request_counter))
    stop_set: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str):
            raise ValidationError("request_id", self.request_id, "a str")
        prompt = self.prompt_token_ids
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
            raise ValidationError("prompt_token_ids", prompt, "a non-empty sequence of token ids")
        # ints here; their range (the device's int32) is the scheduler's admission check, so a
        # KV cache used on its own may hash any int64 ids
        check_token_ids("prompt_token_ids", prompt, -(1 << 63), (1 << 63) - 1)
        if type(self.max_tokens) is not int or not 1 <= self.max_tokens <= INT32_MAX:
            raise ValidationError("max_tokens", self.max_tokens, f"an integer in [1, {INT32_MAX}]")
        if type(self.priority) is not int or not -INT32_MAX <= self.priority <= INT32_MAX:
            raise ValidationError(
                "priority", self.priority, f"an int in [-{INT32_MAX}, {INT32_MAX}]"
            )
        eos = self.eos_token_id
        if eos is not None and (type(eos) is not int or not 0 <= eos <= INT32_MAX):
            raise ValidationError("eos_token_id", eos, f"None or an int in [0, {INT32_MAX}]")
        stops = frozenset(check_token_ids("stop_token_ids", self.stop_token_ids))
        more_eos = frozenset(check_token_ids("eos_token_ids", self.eos_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise ValidationError("ignore_eos", self.ignore_eos, "a bool")
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise ValidationError("cache_salt", self.cache_salt, "None or a str")
        if self.adapter_id is not None:
            check_int("adapter_id", self.adapter_id, -(1 << 63), (1 << 63) - 1)
        if self.seed is not None:
            check_int("seed", self.seed, -(1 << 63), (1 << 63) - 1)
        if self.prompt_leader is not None and not isinstance(self.prompt_leader, str):
            raise ValidationError("prompt_leader", self.prompt_leader, "None or a request id (str)")
        object.__setattr__(self, "stop_token_ids", stops)
        object.__setattr__(self, "eos_token_ids", more_eos)
        eos_ids = more_eos if eos is None else more_eos | {eos}
        object.__setattr__(self, "stop_set", stop_set_of(stops, eos_ids, self.ignore_eos))


_DESCRIPTION_FIELDS = (
    "request_id",
    "prompt_token_ids",
    "max_tokens",
    "eos_token_id",
    "stop_token_ids",
    "ignore_eos",
    "priority",
    "eos_token_ids",
    "cache_salt",
    "adapter_id",
    "sampling_params",
    "seed",
    "prompt_leader",
    "arrival_time",
    "arrival_seq",
    "stop_set",
)


class Request:
    """One sequence being generated: its ``desc`` (a :class:`RequestDescription`, whose fields
    read through as attributes: ``request.request_id``, ``request.stop_set`` ...) and its
    progress, written by the scheduler only:

    - ``all_token_ids``: the prompt followed by the output;
    - ``num_computed_tokens``: leading tokens whose KV is in the cache; it catches up with
      ``num_tokens`` through prefill, chunked prefill, prefix hits, recompute after preemption
      and speculative verification alike;
    - ``num_cached_tokens`` (served from the prefix cache at the last admission), ``status``,
      ``num_preemptions``, ``finish_detail``;
    - ``stop_len``: the total length at which it ends (``max_tokens`` capped by the scheduler's
      longest sequence), set at admission;
    - ``block_table``: the KV cache's handle for its blocks (``allocate_slots``' result; None
      while it holds no blocks).

    ``block_hashes`` belongs to the KV cache manager (its cache of the chained hashes of the
    request's full blocks). Construction takes the description's fields:
    ``Request("r0", prompt_token_ids=[1, 2, 3], max_tokens=8, eos_token_id=2)``.

    CUDA graphs: a host object.
    """

    __slots__ = (
        "desc",
        "all_token_ids",
        "num_computed_tokens",
        "num_cached_tokens",
        "status",
        "num_preemptions",
        "finish_detail",
        "stop_len",
        "block_table",
        "block_hashes",
    )

    def __init__(self, *args: object, **fields: object) -> None:
        desc = args[0] if len(args) == 1 and isinstance(args[0], RequestDescription) else None
        self.desc = desc if desc is not None else RequestDescription(*args, **fields)
        self.all_token_ids: list[int] = list(self.desc.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.finish_detail = ""
        self.stop_len = 0
        self.block_table: BlockTable | None = None
        self.block_hashes: list = []

    def __repr__(self) -> str:
        return (
            f"Request({self.desc.request_id!r}, status={self.status.name}, "
            f"tokens={len(self.all_token_ids)}, computed={self.num_computed_tokens})"
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.desc.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.desc.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.desc.prompt_token_ids) :]

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)


for _name in _DESCRIPTION_FIELDS:  # read-only views of the description (C-level getters)
    setattr(Request, _name, property(attrgetter(f"desc.{_name}")))
del _name
