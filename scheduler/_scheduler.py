"""Continuous batching in the phase-free model.

Each step, every running request asks for ``num_tokens - num_computed_tokens`` tokens (1 for a
decode, a chunk for a prefill, k+1 for a verification), decode-like requests first, under a
token budget and a sequence budget; waiting requests are admitted behind them, prefix hits
skipping computed tokens. When the pool runs dry the lowest-priority, latest-arrived running
request is preempted by recompute: its blocks go back (their cached hashes usually make the
resume cheap) and it waits at the head of its priority class.

Drafts are an input of ``schedule`` (the speculative strategy's, never a field of the
request): the scheduler keeps what fits of them in ``SchedulerOutput.drafts`` and ``update``
applies the verification of exactly those rows.

Pure CPU: imports only ``layerzero_serve.types``, ``errors`` and the KV protocol
(``layerzero_serve.kv_cache.protocol``): any KV cache implementing it serves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import chain

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache.protocol import KVCacheProtocol
from layerzero_serve.scheduler._checks import check_request, check_request_id, check_update
from layerzero_serve.scheduler._config import SchedulerConfig
from layerzero_serve.scheduler._prompt_sharing import WAIT, PromptSharing
from layerzero_serve.scheduler._queues import RequestQueue, sort_key_for
from layerzero_serve.types import (
    Request,
    RequestStatus,
    SchedulerOutput,
    StepOutputs,
)

# A runner turns a SchedulerOutput into the new token ids of each chunk (empty for a prefill
# chunk that does not reach the end of the prompt).
Runner = Callable[[SchedulerOutput], Sequence[Sequence[int]]]

_RUNNING = RequestStatus.RUNNING


def _lookahead(la: int, req: Request, end: int) -> int:
    """Lookahead (draft) slots to reserve past ``end``: at most ``la`` and never past the
    request's last position, so its block table stays within max_model_len (the captured
    graphs' static width)."""
    return la and max(0, min(la, req.stop_len - end))


class Scheduler:
    """Owns the requests and their lifecycle; the KV manager owns their blocks.

    CUDA graphs: host only; it decides each step before the runner launches or replays it.
    """

    def __init__(self, config: SchedulerConfig, kv: KVCacheProtocol) -> None:
        if not isinstance(config, SchedulerConfig):
            raise ValidationError("config", type(config).__name__, "a SchedulerConfig")
        if not isinstance(kv, KVCacheProtocol):
            raise ValidationError(
                "kv", type(kv).__name__, "a KV cache (kv_cache.protocol.KVCacheProtocol)"
            )
        self.config = config
        self.kv = kv
        key = sort_key_for(config.policy)
        self.waiting = RequestQueue(key)
        self.running = RequestQueue(key)
        self.requests: dict[str, Request] = {}
        self._finished_unreported: list[Request] = []
        self._step_id = 0
        self.num_preemptions = 0
        # prompt tokens that went through the model (not served by the prefix cache or a fork)
        self.num_prompt_tokens_computed = 0
        self._sharing = PromptSharing(kv, self.requests)
        # Longest sequence a request may reach: the model's limit or the whole pool, whichever
        # is smaller, so a lone request can always make progress.
        pool_tokens = kv.num_usable_blocks * kv.block_size - config.num_lookahead_tokens
        self.max_seq_len = min(config.max_model_len, pool_tokens)

    # ---- lifecycle -------------------------------------------------------------------------
    def add_request(self, request: Request) -> bool:
        """Queue a request. A request that can never fit is finished at once as rejected (its
        output comes with the next ``update``); returns False then. A bad request (not a
        ``types.Request``, an id in use, fields out of range: see ``_checks.check_request``)
        raises a ValidationError naming the field, and nothing is queued."""
        check_request(request)
        if request.request_id in self.requests:
            raise ValidationError("request_id", request.request_id, "an id not already in use")
        self.requests[request.request_id] = request
        need = request.num_tokens + 1
        if need > self.max_seq_len:
            limit = "max_model_len" if self.max_seq_len == self.config.max_model_len else "KV pool"
            self._finish(
                request,
                RequestStatus.FINISHED_REJECTED,
                f"prompt of {request.num_tokens} tokens + 1 exceeds the {limit} "
                f"({self.max_seq_len} tokens)",
            )
            return False
        request.stop_len = min(request.num_prompt_tokens + request.max_tokens, self.max_seq_len)
        request.status = RequestStatus.WAITING
        self.waiting.add(request)
        return True

    def abort(self, request_id: str) -> bool:
        """Abort in any state; unknown or already finished ids are a no-op (returns False).
        ``request_id`` must be a str (ValidationError otherwise)."""
        return self._end(request_id, RequestStatus.FINISHED_ABORTED, "aborted by the caller")

    def fail(self, request_id: str, detail: str) -> bool:
        """End a request in error (``FINISHED_ERROR``): its own computation failed, e.g. its
        logits were NaN. Its blocks go back now and its output (finish reason "error",
        ``detail``) comes with the next ``update``; no other request is affected. Unknown or
        finished ids are a no-op (returns False)."""
        if not isinstance(detail, str):
            raise ValidationError("detail", detail, "a str")
        return self._end(request_id, RequestStatus.FINISHED_ERROR, detail)

    def end_reported(self, request_id: str, detail: str = "") -> bool:
        """Finish a live request now as stopped (``FINISHED_STOPPED``) when its caller has
        already reported its end (the engine found a stop string in its text): its blocks go
        back and its id is free at once, and no later ``update`` reports it again. Unknown or
        finished ids are a no-op (returns False)."""
        req = self.requests.get(check_request_id(request_id))
        if req is None or req.status.is_finished:
            return False
        (self.running if req.status == _RUNNING else self.waiting).remove(req)
        req.status = RequestStatus.FINISHED_STOPPED
        req.finish_detail = detail
        self.kv.free(req)
        req.block_table = None
        del self.requests[request_id]
        return True

    def _end(self, request_id: str, status: RequestStatus, detail: str) -> bool:
        """Take a live request out of its queue and finish it with ``status`` (abort, fail)."""
        req = self.requests.get(check_request_id(request_id))
        if req is None or req.status.is_finished:
            return False
        (self.running if req.status == _RUNNING else self.waiting).remove(req)
        self._finish(req, status, detail)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or bool(self.running) or bool(self._finished_unreported)

    def _finish(self, req: Request, status: RequestStatus, detail: str = "") -> None:
        req.status = status
        req.finish_detail = detail
        self.kv.free(req)
        req.block_table = None
        self._finished_unreported.append(req)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.block_table = None
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(req)

    # ---- one step --------------------------------------------------------------------------
    def schedule(
        self, lookahead: int | None = None, drafts: Mapping[str, list[int]] | None = None
    ) -> SchedulerOutput:
        """Decide this step's work: running decode-like requests first (one token plus their
        drafts), then running prefills in chunks, then admissions from the head of the waiting
        queue. When blocks run out, requests are preempted from the tail of the running queue
        (a victim already scheduled this step is unscheduled); no admissions in that step.

        ``lookahead``: draft slots to reserve past each request's end for this step, instead of
        ``config.num_lookahead_tokens`` (an engine whose speculation is off this step passes 0:
        no per-request lookahead work; drafts of a later step allocate what they need).

        ``drafts``: request id -> draft token ids to verify this step after the request's last
        token (the speculative strategy's proposal; not kept). A row verifies what the token
        budget and the pool leave of them (``out.drafts``); the rest is dropped."""
        cfg, kv = self.config, self.kv
        max_tokens = cfg.max_num_batched_tokens
        chunk_cap = cfg.max_prefill_chunk or max_tokens
        la = cfg.num_lookahead_tokens
        if lookahead is not None:
            if type(lookahead) is not int or not 0 <= lookahead <= la:
                raise ValidationError("lookahead", lookahead, f"None or an int in [0, {la}]")
            la = lookahead
        if drafts is not None and not isinstance(drafts, Mapping):
            raise ValidationError("drafts", type(drafts).__name__, "None or a mapping id -> ids")
        out = SchedulerOutput(self._step_id, [], [], [], [], 0, [], [])
        reqs, starts, counts, tables = out.requests, out.starts, out.num_scheduled, out.block_ids
        verified = out.drafts
        used = 0
        prefills: list[Request] = []
        deferring = True  # first pass: decode-like rows; prefills wait behind the None marker
        for req in chain(list(self.running.items), (None,), prefills):
            if req is None:
                deferring = False
                continue
            if used >= max_tokens:
                break
            if req.status is not _RUNNING:
                continue  # preempted earlier in this step
            start = req.num_computed_tokens
            d = drafts.get(req.request_id) if drafts else None
            spec = len(d) if d else 0
            want = len(req.all_token_ids) + spec - start
            if want <= spec + 1:
                n = min(want, max_tokens - used)
                if n < want:  # the token budget cuts the drafts: verify only those scheduled
                    d = d[: n - 1]
            elif deferring:
                prefills.append(req)
                continue
            else:
                n = min(want, max_tokens - used, chunk_cap)
                d = None  # drafts only follow a request's last token
            la_r = _lookahead(la, req, start + n) if la else 0  # no call on the hot path
            ids = req.block_table
            if ids is None or start + n + la_r > ids.capacity:  # else: room already reserved
                ids = kv.allocate_slots(req, n, None, la_r)
                if ids is None and d:  # no room for drafts: decode plainly
                    d, n = None, 1
                    ids = kv.allocate_slots(req, 1, None, 0)
                if ids is not None:
                    req.block_table = ids
            if ids is None:
                ids, freed = self._make_room(out, req, n)
                used -= freed
                if ids is None:
                    continue
            if d:
                verified[req.request_id] = d
            reqs.append(req)
            starts.append(start)
            counts.append(n)
            tables.append(ids)
            used += n
        if not out.preempted_ids:
            used = self._admit(out, used, chunk_cap, la)
        out.num_batched_tokens = used
        changes = kv.end_step()
        out.blocks_to_copy = changes.copies
        out.table_edits = changes.table_edits
        self._step_id += 1
        return out

    def schedule_next_decode(self, prev: SchedulerOutput) -> SchedulerOutput | None:
        """The step after ``prev``, scheduled before ``prev``'s tokens are known (async
        scheduling): the same requests in the same rows, each one decode token further, as if
        none ends with ``prev``'s token (a row that does is dropped when this step's tokens
        are applied: ``update`` skips requests that are no longer running).

        None when that is not the step ``schedule`` would make: a request of ``prev`` left the
        running state or ends by length with ``prev``'s token, a running request was not in
        ``prev``, requests wait for admission, a row has drafts, or the pool is short. Only
        the slot of each row's next position is allocated; nothing else changes.
        """
        if not isinstance(prev, SchedulerOutput):
            raise ValidationError("prev", type(prev).__name__, "a SchedulerOutput")
        if self.waiting or prev.drafts or len(prev.requests) != len(self.running):
            return None
        kv = self.kv
        tables = []
        for req, start, n in zip(prev.requests, prev.starts, prev.num_scheduled, strict=True):
            # a running decode row (it samples: start + 1 tokens known) that does not end by
            # length with prev's token (start + 2 tokens then), without drafts
            if (
                req.status is not _RUNNING
                or n != 1
                or start + 1 != len(req.all_token_ids)
                or start + 2 >= req.stop_len
            ):
                return None
            ids = req.block_table
            if ids is None or start + 2 > ids.capacity:
                # num_computed_tokens is still `start` (prev not applied): reserve 2 slots
                ids = kv.allocate_slots(req, start + 2 - req.num_computed_tokens, None, 0)
                if ids is None:
                    return None
                req.block_table = ids
            tables.append(ids)
        rows = len(tables)
        out = SchedulerOutput(
            self._step_id,
            list(prev.requests),
            [s + 1 for s in prev.starts],
            [1] * rows,
            tables,
            rows,
            [],
            [],
        )
        changes = kv.end_step()
        out.blocks_to_copy = changes.copies
        out.table_edits = changes.table_edits
        self._step_id += 1
        return out

    def unschedule(self, out: SchedulerOutput) -> None:
        """A schedule that will not run (async scheduling decided not to launch it): the
        copy-on-write copies it took go to the next schedule instead. The slots it reserved
        stay reserved for the same positions. Host only."""
        if out.blocks_to_copy:
            self.kv.requeue_copies(out.blocks_to_copy)

    def _make_room(
        self, out: SchedulerOutput, req: Request, n: int
    ) -> tuple[list[int] | None, int]:
        """Preempt from the tail of the running queue until ``req`` gets its ``n`` slots or is
        itself the victim. Returns (block table or None, tokens given back by unscheduling
        victims already scheduled in this step)."""
        freed = 0
        la = self.config.num_lookahead_tokens
        while True:
            victim = self.running.pop_back()
            for j in range(len(out.requests) - 1, -1, -1):
                if out.requests[j] is victim:  # scheduled earlier in this step: take it back
                    freed += out.num_scheduled[j]
                    for col in (out.requests, out.starts, out.num_scheduled, out.block_ids):
                        del col[j]
                    out.drafts.pop(victim.request_id, None)
                    break
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is req:
                return None, freed
            la_r = _lookahead(la, req, req.num_computed_tokens + n)
            ids = self.kv.allocate_slots(req, n, None, la_r)
            if ids is not None:
                req.block_table = ids
                return ids, freed

    def _admit(self, out: SchedulerOutput, used: int, chunk_cap: int, la: int) -> int:
        """Admit waiting requests in queue order while the token budget, the sequence cap and
        the pool allow. A request whose prompt another request is prefilling right now is
        passed over until that prefill ends, then forks its KV (``_prompt_sharing``)."""
        kv, waiting, cfg = self.kv, self.waiting, self.config
        budget = cfg.max_num_batched_tokens - used
        items, i = waiting.items, 0
        while i < len(items) and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = items[i]
            leader = self._sharing.for_sample(req)
            if leader is None:
                prefix = kv.match_prefix(req, record_stats=False)
                leader = self._sharing.for_duplicate(req, prefix.num_tokens)
            if leader is WAIT:
                i += 1
                continue
            if leader is not None:  # fork the prompt's KV; compute its last token only
                start, n = req.num_tokens - 1, 1
                ids = self._sharing.fork(leader, req, _lookahead(la, req, start + n))
                if ids is None:
                    break
            else:
                start = prefix.num_tokens
                want = req.num_tokens - start
                if not cfg.enable_chunked_prefill and want > budget:
                    break
                n = min(want, budget, chunk_cap)
                ids = kv.allocate_slots(req, n, prefix, _lookahead(la, req, start + n))
                if ids is None:
                    break
                kv.record_prefix_lookup(req.num_tokens, start)
                self._sharing.note_prefill(req, start, len(self.running))
            req.block_table = ids
            waiting.pop_at(i)
            req.num_computed_tokens = req.num_cached_tokens = start
            req.status = _RUNNING
            self.running.add(req)
            out.requests.append(req)
            out.starts.append(start)
            out.num_scheduled.append(n)
            out.block_ids.append(ids)
            budget -= n
        return cfg.max_num_batched_tokens - budget

    def update(
        self,
        output: SchedulerOutput,
        new_token_ids: Sequence[Sequence[int]],
        *,
        check_rows: bool = True,
    ) -> StepOutputs:
        """Apply a step's results: ``new_token_ids[i]`` are the tokens accepted for row i of
        ``output`` (empty for a prefill chunk short of the prompt's end). Advances
        ``num_computed_tokens``, commits full blocks to the prefix cache, appends tokens, checks
        stop conditions and frees finished requests.

        Every row is checked before any is applied: ``output`` not a SchedulerOutput, a row
        count other than the scheduled one, or a row that is not a list of token ids (ints in
        ``[0, 2**31 - 1]``) raises a ValidationError naming it, and nothing changes.
        ``check_rows=False`` skips the per-row content check (not the row count), for a caller
        whose rows come from a device tensor's ``tolist()`` (the engine's runner): it costs
        about a quarter of ``update``'s host time at batch 256."""
        check_update(output, new_token_ids, check_rows)
        kv = self.kv
        bs = kv.block_size
        rows: list[tuple] = []
        finished: set[str] = set()
        verified = output.drafts
        for req, start, n, toks in zip(
            output.requests, output.starts, output.num_scheduled, new_token_ids, strict=True
        ):
            if req.status is not _RUNNING:
                continue  # aborted or preempted after scheduling
            desc = req.desc  # one lookup for the description fields read below
            if verified and desc.request_id in verified:  # its drafts followed `start`
                self._update_verified(req, start, toks, rows, finished)
                continue
            end = req.num_computed_tokens = start + n
            prompt_len = len(desc.prompt_token_ids)
            if start < prompt_len:  # prefill (or recompute) rows: count their prompt tokens
                self.num_prompt_tokens_computed += min(end, prompt_len) - start
            if end // bs > start // bs:  # a block became full: publish it
                kv.commit(req)
            if not toks:
                continue
            if len(toks) == 1:  # decode fast path: no stop -> stream the token and move on
                t = toks[0]
                all_ids = req.all_token_ids
                all_ids.append(t)
                if t not in desc.stop_set and len(all_ids) < req.stop_len:
                    num_out = len(all_ids) - len(desc.prompt_token_ids)
                    rows.append((desc.request_id, [t], False, None, num_out))
                    continue
                del all_ids[-1]
            status, new = self._append(req, toks)
            if status is not None:
                finished.add(req.request_id)
                req.status = status
                kv.free(req)
                req.block_table = None
            num_out = len(req.all_token_ids) - len(req.prompt_token_ids)
            rows.append((req.request_id, new, status is not None, req.finish_reason, num_out))
        if finished:
            self.running.filter_out(finished)
            for rid in finished:
                del self.requests[rid]
        for req in self._finished_unreported:
            self.requests.pop(req.request_id, None)
            rows.append(
                (
                    req.request_id,
                    [],
                    True,
                    req.finish_reason,
                    req.num_output_tokens,
                    req.finish_detail,
                )
            )
        self._finished_unreported.clear()
        return StepOutputs(rows)

    def _update_verified(
        self, req: Request, start: int, toks: Sequence[int], rows: list, finished: set
    ) -> None:
        """Apply a verification: ``toks`` are the accepted drafts then one target token. The KV
        is valid for the last token and the accepted drafts, i.e. up to ``start + len(toks)``;
        the rejected positions are given back without copying: ``num_computed_tokens`` stops
        there and blocks left empty return to the pool."""
        kv = self.kv
        if not toks:  # the row failed: the engine reports it
            req.num_computed_tokens = start
            return
        status, new = self._append(req, toks)
        end = req.num_computed_tokens = start + len(new)
        if end // kv.block_size > start // kv.block_size:
            kv.commit(req)
        if status is not None:
            finished.add(req.request_id)
            req.status = status
            kv.free(req)
            req.block_table = None
        else:
            kv.trim(req, end)
        num_out = len(req.all_token_ids) - len(req.prompt_token_ids)
        rows.append((req.request_id, new, status is not None, req.finish_reason, num_out))

    @staticmethod
    def _append(req: Request, toks: Sequence[int]) -> tuple[RequestStatus | None, list[int]]:
        """Append accepted tokens one by one, stopping at the first stop condition (tokens after
        it are dropped). Returns (finish status or None, the tokens appended)."""
        all_ids = req.all_token_ids
        stop_set, stop_len = req.stop_set, req.stop_len
        for n, t in enumerate(toks, 1):
            all_ids.append(t)
            if t in stop_set:
                return RequestStatus.FINISHED_STOPPED, list(toks[:n])
            if len(all_ids) >= stop_len:
                return RequestStatus.FINISHED_LENGTH, list(toks[:n])
        return None, list(toks)

    def step(self, runner: Runner) -> StepOutputs:
        """schedule -> runner -> update, the whole loop for one step. ``runner`` must be
        callable; rows it returns that ``update`` rejects raise a ValidationError naming
        ``runner`` (nothing of the step is applied)."""
        if not callable(runner):
            raise ValidationError("runner", type(runner).__name__, "a callable(SchedulerOutput)")
        out = self.schedule()
        toks = runner(out) if out.requests else []
        try:
            check_update(out, toks)
        except ValidationError as e:
            raise ValidationError("runner", e.value, e.allowed, f"its result: {e}") from None
        return self.update(out, toks)
