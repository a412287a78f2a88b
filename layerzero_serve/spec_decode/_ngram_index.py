"""Incremental n-gram index of one request: the most recent end position of every n-gram seen,
so an n-gram lookup proposal costs O(max_n) dictionary operations per step instead of a scan
over the context.

Invariant: for a history ``t[0..L)`` the table of length ``n`` maps each n-gram *ending before
``L``* (end ``e <= L - 1``, exclusive) to its largest such end. The suffix n-gram (end ``L``)
is entered only when the next token arrives, so a lookup of the suffix finds its most recent
*earlier* occurrence, exactly as ``ngram.find_ngram_match`` does.

Keys are a 64-bit polynomial hash of the n-gram (a Python int, smaller than the tuple); a hit
is confirmed by comparing the tokens, so a hash collision can only hide a match (probability
~2^-64 for unrelated n-grams), never produce a wrong one. The same hash is computed per token in
Python for small appends and vectorised with numpy (uint64 arithmetic wraps mod 2^64, like the
masked Python ints) for long ones, such as a prompt or the tokens of many idle steps, where the
per-token loop would cost about a microsecond per token and n-gram length. Memory: about 100
bytes per token per n-gram length.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from layerzero_serve.errors import ValidationError
from layerzero_serve.spec_decode._proposer import check_int

__all__ = ["NgramIndex"]

_MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier of the polynomial hash
_MASK = (1 << 64) - 1
_VECTOR_MIN = 16  # appends at least this long take the numpy path


def gram_hash(gram: Iterable[int]) -> int:
    """The index key of one n-gram: sum of ``(t_j + 1) * MULT^(n-1-j)`` modulo 2^64."""
    h = 0
    for t in gram:
        h = (h * _MULT + t + 1) & _MASK
    return h


def _gram_hashes(window: list[int], n: int, count: int) -> list[int]:
    """Keys of the ``count`` n-grams ``window[i : i + n]``, ``i = 0 .. count-1`` (numpy)."""
    a = np.asarray(window, dtype=np.uint64) + np.uint64(1)
    h = np.zeros(count, dtype=np.uint64)
    mult = np.uint64(_MULT)
    for j in range(n):
        h = h * mult + a[j : j + count]  # uint64 arrays wrap modulo 2^64
    return h.tolist()


class NgramIndex:
    """Most recent occurrence of every n-gram (``min_n <= n <= max_n``) of one token history."""

    __slots__ = ("min_n", "max_n", "_tokens", "_tables")

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = check_int("min_n", min_n, 1, 64)
        self.max_n = check_int("max_n", max_n, 1, 64)
        if max_n < min_n:
            raise ValidationError("max_n", max_n, f"int in [min_n={min_n}, 64]")
        self._tokens: list[int] = []
        self._tables: list[dict[int, int]] = [{} for _ in range(min_n, max_n + 1)]

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def last_token(self) -> int | None:
        return self._tokens[-1] if self._tokens else None

    def extend(self, new_tokens: Iterable[int]) -> None:
        """Append tokens; O(max_n - min_n + 1) per token (vectorised for long appends)."""
        toks = self._tokens
        old = len(toks)
        new = [int(t) for t in new_tokens]
        toks.extend(new)
        if len(new) >= _VECTOR_MIN:
            self._enter_vectorised(old)
            return
        lo = self.min_n
        # The n-grams ending at `end` were the suffix; they now become earlier occurrences.
        for end in range(old, len(toks)):
            for n, table in enumerate(self._tables, start=lo):
                if n > end:
                    break
                table[gram_hash(toks[end - n : end])] = end

    def _enter_vectorised(self, old: int) -> None:
        """Enter the n-grams ending at ``old .. len - 1`` (the ``extend`` invariant), in
        increasing end order so the most recent occurrence wins."""
        toks = self._tokens
        last = len(toks) - 1
        for n, table in enumerate(self._tables, start=self.min_n):
            first = max(n, old)
            count = last - first + 1
            if count <= 0:
                continue
            keys = _gram_hashes(toks[first - n : last], n, count)
            table.update(zip(keys, range(first, last + 1), strict=True))

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest
        matching suffix n-gram; ``[]`` when none matches."""
        toks = self._tokens
        length = len(toks)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            gram = toks[length - n :]
            end = self._tables[n - self.min_n].get(gram_hash(gram))
            if end is not None and toks[end - n : end] == gram:
                return toks[end : end + k]
        return []
