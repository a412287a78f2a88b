"""Prompt-lookup (n-gram) drafting: no extra model. If the context ends with an n-gram seen
earlier, guess that what followed it then follows it again (code, quotes, repeated structure).

Rule, for a request with tokens ``t[0..L)``: for ``n`` from ``max_n`` down to ``min_n``, find the
most recent earlier occurrence of the suffix ``t[L-n:L]`` (a start ``s < L - n`` with
``t[s:s+n] == t[L-n:L]``, overlap with the suffix allowed); at the first ``n`` that has one,
propose ``t[s+n : s+n+k]`` (fewer than ``k`` when the sequence ends first). No match: no drafts.

Two ways to run it, same results:

* stateless: a numpy scan over the whole context, O(max_n * L) vectorised (about 20 us at
  L = 4096 given an int array; converting a 4k Python list costs 50-100 us more);
* incremental (``request_ids`` given): a per-request :class:`NgramIndex` that costs O(max_n) per
  new token and per proposal, whatever the context length (a few us per request and step).
  Building one is Python work over the whole context (~0.5 ms per 1k tokens, ~15x a scan),
  which pays off only for a request asked every step: the adaptive k's shadow probes (a
  rotating slice of the batch, now and then) ask without ids (``probe_without_ids``) and scan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from layerzero_serve.errors import ValidationError
from layerzero_serve.spec_decode._ngram_index import NgramIndex
from layerzero_serve.spec_decode._proposer import MAX_K, Proposer, check_int

__all__ = ["NgramProposer", "find_ngram_match"]


def find_ngram_match(tokens: np.ndarray, min_n: int, max_n: int) -> tuple[int, int]:
    """Longest suffix n-gram (``min_n <= n <= max_n``) with an earlier occurrence.

    Args:
        tokens: 1-D integer array ``t[0..L)``.

    Returns:
        ``(n, end)``: the n-gram length and the end (exclusive) of its most recent earlier
        occurrence, so the proposal starts at ``end``; ``(0, -1)`` when nothing matches.
    """
    length = tokens.shape[0]
    if length < min_n + 1:
        return 0, -1
    # Candidate ends e in [1, L-1] sit at index e-1. run[e-1] counts how many tokens before e
    # match the tokens before L, backwards, capped at max_n: one vectorised compare per m.
    same = tokens[: length - 1] == tokens[length - 1]
    run = same.astype(np.int32)
    for m in range(2, min(max_n, length - 1) + 1):
        same[m - 1 :] &= tokens[: length - m] == tokens[length - m]
        same[m - 2] = False  # an n-gram cannot start before index 0
        run += same
    best = int(run.max())
    if best < min_n:
        return 0, -1
    last = length - 2 - int(np.argmax(run[::-1] == best))  # most recent end with that length
    return best, last + 1


class NgramProposer(Proposer):
    """Prompt-lookup proposer (see the module docstring).

    Args:
        k: default number of drafts per request, in ``[0, MAX_K]``.
        min_n, max_n: n-gram lengths tried, longest first; ``1 <= min_n <= max_n <= 64``.

    CUDA graphs: host only (Python and numpy over the token lists).
    """

    name = "ngram"
    needs_model = False
    probe_without_ids = True  # the scan and the index give the same drafts

    def __init__(self, k: int = 4, min_n: int = 2, max_n: int = 4) -> None:
        self.k = check_int("k", k, 0, MAX_K)
        self.min_n = check_int("min_n", min_n, 1, 64)
        self.max_n = check_int("max_n", max_n, 1, 64)
        if self.max_n < self.min_n:
            raise ValidationError("max_n", max_n, f"int in [min_n={self.min_n}, 64]")
        self._indexes: dict[str, NgramIndex] = {}

    def propose(
        self,
        requests_tokens: Sequence[Sequence[int]],
        k: int | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> list[list[int]]:
        """Drafts per request (see :meth:`Proposer.propose`); ``k=None`` uses ``self.k``.

        With ``request_ids`` the proposer keeps one incremental index per request and feeds it
        only the tokens appended since the last call (token histories must grow by appending;
        a shorter history or a changed last token rebuilds the index). Call :meth:`release`
        when a request finishes. Without ``request_ids`` every call scans the full context. The
        drafts are the same either way.
        """
        k = self.k if k is None else check_int("k", k, 0, MAX_K)
        if request_ids is not None and len(request_ids) != len(requests_tokens):
            raise ValidationError(
                "request_ids", len(request_ids), f"{len(requests_tokens)} ids (one per request)"
            )
        if k == 0:
            return [[] for _ in requests_tokens]
        if request_ids is None:
            return [self._propose_scan(tokens, k) for tokens in requests_tokens]
        return [
            self._index_for(rid, tokens).propose(k)
            for rid, tokens in zip(request_ids, requests_tokens, strict=True)
        ]

    def _propose_scan(self, tokens: Sequence[int], k: int) -> list[int]:
        arr = np.asarray(tokens)
        n, end = find_ngram_match(arr, self.min_n, self.max_n)
        return [] if n == 0 else arr[end : end + k].tolist()

    def _index_for(self, request_id: str, tokens: Sequence[int]) -> NgramIndex:
        index = self._indexes.get(request_id)
        seen = 0 if index is None else index.num_tokens
        if index is None or seen > len(tokens) or (seen and index.last_token != tokens[seen - 1]):
            index = self._indexes[request_id] = NgramIndex(self.min_n, self.max_n)
            seen = 0
        if seen < len(tokens):
            index.extend(tokens[seen:])
        return index

    def release(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)
