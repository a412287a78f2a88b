"""Ordered request queues for the two scheduling policies.

Both keep requests sorted by ``(priority, arrival_seq)`` for the priority policy and by
``arrival_seq`` for FCFS, so the head is the next to admit and the tail the first to preempt.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from layerzero_serve.types import Request


def sort_key_for(policy: str) -> Callable[[Request], tuple[int, int]]:
    if policy == "priority":
        return lambda r: (r.priority, r.arrival_seq)
    return lambda r: (0, r.arrival_seq)


class RequestQueue:
    """A list kept sorted by the policy key; O(log n) search, O(n) insert (memmove-cheap)."""

    __slots__ = ("_items", "_key")

    def __init__(self, key: Callable[[Request], tuple[int, int]]) -> None:
        self._items: list[Request] = []
        self._key = key

    def add(self, request: Request) -> None:
        bisect.insort(self._items, request, key=self._key)

    def remove(self, request: Request) -> bool:
        try:
            self._items.remove(request)
        except ValueError:
            return False
        return True

    def peek(self) -> Request:
        return self._items[0]

    def pop_front(self) -> Request:
        return self._items.pop(0)

    def pop_at(self, index: int) -> Request:
        return self._items.pop(index)

    def pop_back(self) -> Request:
        return self._items.pop()

    @property
    def items(self) -> list[Request]:
        """The sorted list (read it; mutate only through this class)."""
        return self._items

    def filter_out(self, drop: set[str]) -> None:
        self._items = [r for r in self._items if r.request_id not in drop]

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)
