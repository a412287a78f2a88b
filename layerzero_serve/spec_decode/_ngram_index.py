"""Incremental n-gram index of one request: the most recent end position of every n-gram seen,
so an n-gram lookup proposal costs O(max_n) dictionary operations per step instead of a scan
over the context.

Invariant: for a history ``t[0..L)`` the table of length ``n`` maps each n-gram *ending before
``L``* (end ``e <= L - 1``, exclusive) to its largest such end. The suffix n-gram (end ``L``)
is entered only when the next token arrives, so a lookup of the suffix finds its most recent
*earlier* occurrence, exactly as ``ngram.find_ngram_match`` does.

Keys are ``hash(tuple(ngram))`` (a Python int, smaller than the tuple); a hit is confirmed by
comparing the tokens, so a hash collision can only hide a match (probability ~2^-64), never
produce a wrong one. Memory: about 100 bytes per token per n-gram length.
"""

from __future__ import annotations

from collections.abc import Iterable

from layerzero_serve.errors import ValidationError
from layerzero_serve.spec_decode._proposer import check_int

__all__ = ["NgramIndex"]


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
        """Append tokens; O(max_n - min_n + 1) per token."""
        toks = self._tokens
        lo = self.min_n
        for token in new_tokens:
            end = len(toks)
            # The n-grams ending at `end` were the suffix; they now become earlier occurrences.
            for n, table in enumerate(self._tables, start=lo):
                if n > end:
                    break
                table[hash(tuple(toks[end - n : end]))] = end
            toks.append(int(token))

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest
        matching suffix n-gram; ``[]`` when none matches."""
        toks = self._tokens
        length = len(toks)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            gram = toks[length - n :]
            end = self._tables[n - self.min_n].get(hash(tuple(gram)))
            if end is not None and toks[end - n : end] == gram:
                return toks[end : end + k]
        return []
