"""The scheduler talks to the KV cache only through ``kv_cache.protocol.KVCacheProtocol``: a
minimal implementation written here (no prefix cache, a plain stack of free block ids) serves
it, and every request's output equals the cache-free reference, under preemption and
speculative rollback alike."""

from __future__ import annotations

import pytest
from fake_model import FakeModel, reference_output

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.kv_cache.protocol import BlockTable, KVCacheProtocol, KVStepChanges
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.types import Request

BS = 4


class _NoMatch:
    num_tokens = 0


class StackKV:
    """The smallest KV cache the scheduler accepts: blocks from a stack, no sharing, no cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, 0, -1))  # block 0 stays the null block
        self._tables: dict[str, BlockTable] = {}
        self.calls: list[str] = []

    @property
    def num_usable_blocks(self) -> int:
        return len(self._free) + sum(len(t) for t in self._tables.values())

    def match_prefix(self, request, record_stats=True):
        return _NoMatch()

    def record_prefix_lookup(self, num_tokens, num_hit_tokens) -> None:
        self.calls.append("record_prefix_lookup")

    def allocate_slots(self, request, num_new_tokens, prefix=None, num_lookahead_tokens=0):
        table = self._tables.get(request.request_id)
        have = 0 if table is None else len(table)
        total = request.num_computed_tokens + num_new_tokens + num_lookahead_tokens
        need = -(-total // self.block_size) - have
        if need > len(self._free):
            return None
        if table is None:
            table = self._tables[request.request_id] = BlockTable()
        table.extend(self._free.pop() for _ in range(max(need, 0)))
        table.capacity = len(table) * self.block_size
        return table

    def commit(self, request) -> None:
        self.calls.append("commit")

    def trim(self, request, num_tokens) -> None:
        table = self._tables.get(request.request_id)
        keep = -(-num_tokens // self.block_size)
        if table is not None and keep < len(table):
            self._free.extend(reversed(table[keep:]))
            del table[keep:]
            table.capacity = keep * self.block_size

    def free(self, request) -> None:
        table = self._tables.pop(request.request_id, None)
        if table is not None:
            table.capacity = 0
            self._free.extend(reversed(table))

    def end_step(self) -> KVStepChanges:
        return KVStepChanges([], 0)

    def requeue_copies(self, pairs) -> None:
        assert not pairs


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 31 + i * 7 + 3) % 97 for i in range(n)]


def _run(kv, model, prompts, max_tokens, drafts_of=None, **cfg):
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, **cfg), kv)
    for i, p in enumerate(prompts):
        sched.add_request(Request(str(i), p, max_tokens=max_tokens))
    got: dict[str, list[int]] = {}
    for _ in range(5000):
        if not sched.has_unfinished():
            return got, sched
        drafts = None if drafts_of is None else drafts_of(sched, model)
        out = sched.schedule(drafts=drafts)
        rows = model(out) if out.requests else []
        for o in sched.update(out, rows):
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("did not finish")


def test_both_implementations_satisfy_the_protocol():
    assert isinstance(StackKV(8, BS), KVCacheProtocol)
    assert isinstance(KVCacheManager(8, BS), KVCacheProtocol)


def test_a_minimal_kv_cache_serves_the_scheduler_under_preemption():
    prompts = [_prompt(5 + 3 * i, i) for i in range(6)]
    model = FakeModel(16, BS)
    kv = StackKV(16, BS)  # 15 usable blocks for 6 requests of up to 28 tokens: preemptions
    got, sched = _run(kv, model, prompts, 12, max_num_seqs=6)
    assert sched.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert got[str(i)] == reference_output(model, p, 12)
    assert kv.num_usable_blocks == 15 and not kv._tables  # every block came back


def test_a_minimal_kv_cache_serves_speculative_rollback():
    """Drafts given to ``schedule``: half right, half wrong; rejected positions are trimmed."""

    def drafts_of(sched, model):
        out = {}
        for r in sched.running.items:
            if r.num_computed_tokens == len(r.all_token_ids) - 1:
                ctx = list(r.all_token_ids)
                good = model.next_token(ctx)
                out[r.request_id] = [good, (good + 1) % model.vocab_size]
        return out

    class Verifying(FakeModel):
        def __call__(self, out):
            rows = super().__call__(out)  # checks the KV of every scheduled position
            for i, r in enumerate(out.requests):
                d = out.drafts.get(r.request_id)
                if d:  # accept the drafts the model agrees with, then its own token
                    ctx, toks = list(r.all_token_ids), []
                    for t in d:
                        want = self.next_token(ctx)
                        if t != want:
                            break
                        toks.append(t)
                        ctx.append(t)
                    rows[i] = toks + [self.next_token(ctx)]
            return rows

    prompts = [_prompt(6 + i, i) for i in range(4)]
    model = Verifying(64, BS)
    kv = StackKV(64, BS)
    got, _ = _run(kv, model, prompts, 10, drafts_of=drafts_of, num_lookahead_tokens=2)
    for i, p in enumerate(prompts):
        assert got[str(i)] == reference_output(model, p, 10)
    assert kv.num_usable_blocks == 63 and not kv._tables


def test_an_object_without_the_protocol_is_rejected():
    with pytest.raises(ValidationError, match="kv"):
        Scheduler(SchedulerConfig(), object())
