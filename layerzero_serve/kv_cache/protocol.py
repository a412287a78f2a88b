"""The interface between the scheduler and a KV cache: what the scheduler may ask, nothing more.

The scheduler never sees blocks, ref counts or hashes. Per request it holds one opaque handle,
the :class:`BlockTable` that ``allocate_slots`` returns: the request's live block ids (a list
the manager keeps up to date, read by the runner) and ``capacity``, the token slots already
reserved, so a decode step that stays within them needs no call at all. ``KVCacheManager`` is
the implementation; any object with these members serves (a test runs the scheduler on a
minimal one).

CUDA graphs: host only; nothing here touches the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from layerzero_serve.types import Request

__all__ = ["BlockTable", "KVCacheProtocol", "KVStepChanges"]


class BlockTable(list):
    """One request's block ids, in order (a ``list``, so it compares equal to a plain list of
    the same ids), plus ``capacity``: token slots reserved for the request (its computed tokens,
    the new ones and any lookahead), so the scheduler can tell without asking whether the next
    tokens fit. Owned and updated by the KV manager; everyone else reads it.

    CUDA graphs: a host object; the runner copies its ids into the device block table.
    """

    __slots__ = ("capacity",)

    def __init__(self, ids: Sequence[int] = ()) -> None:
        super().__init__(ids)
        self.capacity = 0


@dataclass(slots=True)
class KVStepChanges:
    """What a step's schedule changed in the KV cache besides appends, for the runner:
    ``copies`` (src, dst) block pairs to copy before the forward (copy-on-write after a fork),
    and ``table_edits``, a counter bumped by every in-place edit of a live table (copy-on-write,
    trim): a runner may keep cached block-table rows while it stays the same."""

    copies: list[tuple[int, int]]
    table_edits: int


@runtime_checkable
class KVCacheProtocol(Protocol):
    """What the scheduler needs of a KV cache (``KVCacheManager`` implements it).

    - ``match_prefix(request, record_stats)`` -> an opaque prefix match with ``num_tokens``
      (cached tokens at the start of the request; never its last known token).
    - ``allocate_slots(request, n, prefix, lookahead)`` -> the request's :class:`BlockTable`
      with room for ``n`` new tokens after the computed ones (plus ``lookahead`` slots), or None
      when the pool is short; atomic: None changes nothing.
    - ``record_prefix_lookup(num_tokens, num_hit_tokens)``: count one admission's lookup.
    - ``commit(request)``: publish blocks that became full of computed tokens.
    - ``trim(request, num_tokens)``: give back blocks past ``num_tokens`` slots (rollback).
    - ``free(request)``: give back all of the request's blocks (finish, preemption).
    - ``end_step()`` -> :class:`KVStepChanges` of the step just scheduled;
      ``requeue_copies(pairs)`` hands back copies of a schedule that was not run, so the next
      ``end_step`` reports them.
    """

    block_size: int

    @property
    def num_usable_blocks(self) -> int: ...

    def match_prefix(self, request: Request, record_stats: bool = True) -> object: ...

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None: ...

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        prefix: object | None = None,
        num_lookahead_tokens: int = 0,
    ) -> BlockTable | None: ...

    def commit(self, request: Request) -> None: ...

    def trim(self, request: Request, num_tokens: int) -> None: ...

    def free(self, request: Request) -> None: ...

    def end_step(self) -> KVStepChanges: ...

    def requeue_copies(self, pairs: Sequence[tuple[int, int]]) -> None: ...
