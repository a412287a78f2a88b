"""What every draft proposer offers the verifier: up to ``k`` draft token ids per request.

A proposer may return fewer than ``k`` ids for a request (0 = no guess); the runner pads the
drafts into ``draft_ids [B, k]`` with ``num_drafts [B]`` for verification (see
:mod:`layerzero_serve.spec_decode._rejection`). Draft ids are not range-checked here: the verifier
rejects ids outside the vocabulary on the device.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from layerzero_serve.errors import check_int

__all__ = ["MAX_K", "Proposer", "check_int"]

# Largest number of drafts per request and step: a verification pass of k + 1 query tokens per
# request beyond this costs more than any acceptance rate can pay back.
MAX_K = 64


class Proposer(abc.ABC):
    """A source of draft tokens.

    Attributes:
        name: short identifier for logs and metrics (``"ngram"``, ``"draft_model"``...).
        needs_model: True when proposing runs a model on the device (the runner must schedule
            its forward passes and KV); False for host-only proposers such as n-gram lookup.
        probe_without_ids: True when ``propose`` without ``request_ids`` gives the same drafts
            (a stateless lookup): the adaptive k's shadow probes then omit the ids, so no
            per-request state is built for requests that are not speculating.

    A failing proposer never fails a request: an exception from ``propose``, ``release``, an
    attribute read (``name``, ``probe_without_ids``) or while its returned rows are iterated
    (``__iter__``, an entry's ``__index__``) costs drafts only (that step's, or that row's). It
    is counted in ``Engine.stats()["speculative"]["proposer_errors"]`` and logged (the 1st, 2nd,
    4th, 8th ... time); every request still gets exactly the tokens of plain decoding.

    CUDA graphs: ``propose`` runs on the host between steps, never inside the target's capture; a
    proposer that runs a model may replay graphs of its own there.
    """

    name: str = "proposer"
    needs_model: bool = False
    probe_without_ids: bool = False

    @abc.abstractmethod
    def propose(self, requests_tokens: Sequence[Sequence[int]], k: int) -> list[list[int]]:
        """Draft continuations.

        Args:
            requests_tokens: per request, its prompt + output token ids so far (lists, tuples or
                1-D integer numpy arrays).
            k: most drafts per request, in ``[0, MAX_K]``.

        Returns:
            One list per request with at most ``k`` draft ids (possibly empty).
        """

    def release(self, request_id: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """Forget per-request state (finished or aborted request). No-op by default."""
