"""Prompt sharing at admission: a waiting request whose prompt another request is computing
right now waits for that prefill, then forks the other's KV blocks instead of computing them
again (the KV cache's ``fork``: the full blocks by reference, the partly filled last block
copied on the first write).

Two kinds of pairs share:

* the ``n`` samples of one request: samples ``1..n-1`` name sample 0 as their
  ``prompt_leader``;
* identical prompts that arrive together (same tokens, cache salt and adapter): with prefix
  caching on, a request admitted to prefill is remembered by the hashes of the first prompt
  block it computes and of its last full one; a later request with the same prompt waits for
  it and forks, one that only starts the same waits for its blocks to reach the prefix cache.

A request that forks computes only its last prompt token (its own logits there give its own
first sample); every other prompt position is the leader's. Host only.
"""

from __future__ import annotations

from layerzero_serve.kv_cache.protocol import BlockTable, KVCacheProtocol
from layerzero_serve.types import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING

WAIT = "wait"  # the leader is still prefilling the prompt: pass the request over this step


class PromptSharing:
    """Decides, per waiting request, whether it waits for, forks from, or runs apart from a
    request computing the same prompt. ``requests``: the scheduler's live requests by id (read
    only)."""

    def __init__(self, kv: KVCacheProtocol, requests: dict[str, Request]) -> None:
        self._kv = kv
        self._requests = requests
        self._can_fork = callable(getattr(kv, "fork", None))  # fork is optional in the protocol
        # hash of a prompt block -> the request computing that block now (see note_prefill)
        self._heads: dict[object, Request] = {}

    def for_sample(self, req: Request) -> Request | str | None:
        """For a request with a ``prompt_leader``: that leader once it has prefilled (fork
        from it), ``WAIT`` while it prefills, None when there is none to share with (the
        leader ended or was preempted, or ``req`` is not fresh)."""
        name = req.desc.prompt_leader
        if name is None:
            return None
        return self._leader_state(self._requests.get(name), req)

    def for_duplicate(self, req: Request, start: int) -> Request | str | None:
        """For a request whose prefix-cache match ends at token ``start``: a running request
        with the same prompt (``WAIT`` while it prefills, then fork from it), else ``WAIT``
        while a running prefill computes the first block ``req`` missed (its blocks reach the
        prefix cache when that ends), else None. Needs prefix caching (the block hashes)."""
        k = start // self._kv.block_size
        hashes = req.block_hashes
        if not hashes:
            return None
        # the whole prompt's chain (its blocks may all be cached already), then the missed block
        for h in (hashes[-1], hashes[k]) if k < len(hashes) else (hashes[-1],):
            other = self._heads.get(h)
            if other is None or other is req:
                continue
            state = self._leader_state(other, req)
            if state is not None:
                return state
            if _prefilling(other):
                return WAIT
        return None

    def note_prefill(self, req: Request, start: int, num_running: int) -> None:
        """``req`` was admitted to compute its prompt from token ``start``: remember it by the
        hashes of the first block it computes and of its last full prompt block, so a prompt
        that starts or is all the same waits for it."""
        k = start // self._kv.block_size
        hashes = req.block_hashes
        if k >= len(hashes):
            return
        heads = self._heads
        if len(heads) > 4 * num_running + 16:  # drop requests that ended
            self._heads = heads = {h: r for h, r in heads.items() if r.status is _RUNNING}
        heads[hashes[k]] = heads[hashes[-1]] = req

    def fork(self, leader: Request, req: Request, lookahead: int) -> BlockTable | None:
        """Give ``req`` the leader's KV of all its prompt tokens but the last, and reserve the
        slot of that one (plus ``lookahead``): ``req``'s block table, or None when the pool
        is short (then ``req`` holds nothing, as before)."""
        kv = self._kv
        kv.fork(leader, req, req.num_tokens - 1)
        ids = kv.allocate_slots(req, 1, None, lookahead)
        if ids is None:
            kv.free(req)
            req.num_computed_tokens, req.block_hashes = 0, []
        return ids

    def _leader_state(self, leader: Request | None, req: Request) -> Request | str | None:
        if (
            leader is None
            or not self._can_fork
            or leader.status is not _RUNNING
            or req.num_tokens != req.num_prompt_tokens  # a resumed request has its own tokens
            # the prefix cache's isolation: only the same salt and adapter share KV
            or leader.desc.cache_salt != req.desc.cache_salt
            or leader.desc.adapter_id != req.desc.adapter_id
            or leader.all_token_ids[: req.num_tokens] != req.all_token_ids
        ):
            return None
        return WAIT if leader.num_computed_tokens < req.num_tokens - 1 else leader


def _prefilling(req: Request) -> bool:
    return req.status is _RUNNING and req.num_computed_tokens < req.num_prompt_tokens - 1
