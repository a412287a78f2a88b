"""Invariant fuzzing of the KV cache manager against an independent model.

Random admissions (with prefix hits drawn from a few shared base prompts), chunked prefill,
decode, token appends, commits, forks, preemptions, aborts, trims and prefix-cache resets run
over pools of 2 to 1024 blocks, block sizes 1, 4 and 16, with the sha256, fast and a constant
(always colliding) block hash. After every manager call:

* ``mgr.check_integrity()`` (the library's own exhaustive check);
* an independent model of the pool must agree exactly: the free list order (plain blocks to
  the front, cached ones to the back, tail first), every ref count, which blocks are cached,
  every block table, which block ids an allocation hands out, copy-on-write pairs, eviction
  counts, and whether an allocation must succeed at all;
* a shadow KV memory: every token a request has computed must still be readable through its
  block table (so no shared block was ever overwritten), every prefix hit must hold exactly
  the KV the request would have computed, and (with every hash, colliding or not) the hit must
  be the longest run of leading blocks whose content the model says is cached.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.types import Request


def const_hash(parent, token_ids):
    return 0


def make_manager(num_blocks: int, block_size: int, algo: str) -> KVCacheManager:
    if algo == "const":
        return KVCacheManager(num_blocks, block_size, hash_fn=const_hash)
    return KVCacheManager(num_blocks, block_size, hash_algo=algo)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Sim:
    """A request plus the identity of the KV of each of its tokens."""

    __slots__ = ("req", "keys", "max_len")

    def __init__(self, req: Request, max_len: int) -> None:
        self.req = req
        self.max_len = max_len
        self.keys: list[int] = []
        self.sync_keys()

    def sync_keys(self) -> None:
        toks, keys = self.req.all_token_ids, self.keys
        prev = keys[-1] if keys else hash(("root", self.req.cache_salt, self.req.adapter_id))
        for tok in toks[len(keys) :]:
            prev = hash((prev, tok))  # a token's KV depends on itself and everything before
            keys.append(prev)


class KVFuzzer:
    def __init__(
        self, seed: int, num_blocks: int, block_size: int, algo: str, check_every: int = 1
    ) -> None:
        self.rng = random.Random(seed)
        self.algo = algo
        self.mgr = make_manager(num_blocks, block_size, algo)
        self.pool = self.mgr.pool
        self.nb, self.bs = num_blocks, block_size
        self.usable = num_blocks - 1
        self.check_every = check_every
        self.num_integrity_checks = 0
        self.max_used = 0
        # ---- the model ----
        self.mem = [[None] * block_size for _ in range(num_blocks)]  # shadow KV per slot
        self.published: dict[int, int] = {}  # cached block id -> identity of its content
        self.model_free: list[int] = list(range(1, num_blocks))
        self.owners = [0] * num_blocks
        self.tables: dict[str, list[int]] = {}
        self.live: dict[str, Sim] = {}
        self.waiting: dict[str, Sim] = {}
        self.next_id = 0
        self.vocab = 3 if algo == "const" else 5
        self.max_prompt = max(2 * block_size, min(64 * block_size, (self.usable * block_size) // 2))
        self.max_reqs = 4 + min(20, self.usable // 4)
        self.base = [
            [self.rng.randrange(self.vocab) for _ in range(self.max_prompt)] for _ in range(3)
        ]
        self.ops = Counter()
        self.num_ops = 0
        self.num_mgr_calls = 0
        self.touched: Sim | None = None

    # ---- checks -------------------------------------------------------------------------------
    def after_call(self) -> None:
        """Run after every manager call: the exhaustive checks (O(num_blocks)) every
        ``check_every`` calls (every call for small pools), the touched request's memory always."""
        self.num_mgr_calls += 1
        if self.num_mgr_calls % self.check_every == 0:
            self.mgr.check_integrity()
            self.num_integrity_checks += 1
            self.check_model()
            for sim in self.live.values():
                self.check_memory(sim)
        elif self.touched is not None and self.touched.req.request_id in self.live:
            self.check_memory(self.touched)

    def check_model(self) -> None:
        pool = self.pool
        assert [b.block_id for b in pool.iter_free()] == self.model_free
        assert pool.num_free == len(self.model_free) == self.mgr.num_free_blocks
        blocks = pool.blocks
        assert blocks[0].ref_cnt == 1 and blocks[0].block_hash is None
        owners, published = self.owners, self.published
        for bid in range(1, self.nb):
            b = blocks[bid]
            assert b.ref_cnt == owners[bid], (bid, b.ref_cnt, owners[bid])
            assert (b.block_hash is not None) == (bid in published), bid
        seen_cached = False
        for bid in self.model_free:  # plain blocks first, cached ones behind them
            if bid in published:
                seen_cached = True
            else:
                assert not seen_cached, f"plain block {bid} behind a cached one"
        assert set(self.mgr.owned_blocks()) == set(self.tables)  # failed admissions left none
        for rid, table in self.tables.items():
            assert self.mgr.block_ids(rid) == table, rid

    def check_memory(self, sim: Sim) -> None:
        r, mem, bs = sim.req, self.mem, self.bs
        table = self.tables[r.request_id]
        assert len(table) >= cdiv(r.num_computed_tokens, bs)
        keys = sim.keys
        for pos in range(r.num_computed_tokens):
            assert mem[table[pos // bs]][pos % bs] == keys[pos], (r.request_id, pos)

    def longest_cached(self, sim: Sim) -> int:
        """Model oracle: longest run of leading full blocks whose content some cached block
        holds (never the last known token)."""
        idents = set(self.published.values())
        bs, keys = self.bs, sim.keys
        n = 0
        for i in range((sim.req.num_tokens - 1) // bs):
            if keys[(i + 1) * bs - 1] not in idents:
                break
            n += 1
        return n

    # ---- model updates ------------------------------------------------------------------------
    def release(self, table: list[int]) -> None:
        """Model of dropping one reference on each block, in the given order."""
        for bid in table:
            self.owners[bid] -= 1
            assert self.owners[bid] >= 0
            if self.owners[bid] == 0:
                if bid in self.published:
                    self.model_free.append(bid)
                else:
                    self.model_free.insert(0, bid)

    def snapshot(self):
        return (
            [b.block_id for b in self.pool.iter_free()],
            [(b.ref_cnt, b.block_hash, b.token_ids, b.parent_ref, b.gen) for b in self.pool.blocks],
            {rid: list(self.mgr.block_ids(rid)) for rid in self.tables},
            self.pool.num_evictions,
        )

    def allocate(self, sim: Sim, n: int, prefix, la: int):
        r = sim.req
        rid = r.request_id
        bs, owners = self.bs, self.owners
        old = self.tables.get(rid, [])
        hits = [b.block_id for b in prefix.blocks] if prefix is not None else []
        computed = r.num_computed_tokens + len(hits) * bs
        n_new = max(0, cdiv(computed + n + la, bs) - len(old) - len(hits))
        idx = computed // bs
        cow = computed % bs != 0 and n > 0 and len(old) > idx and owners[old[idx]] > 1
        need = n_new + int(cow) + sum(1 for h in hits if owners[h] == 0)
        small = self.nb <= 64
        before = self.snapshot() if small else None
        ev_before = self.pool.num_evictions
        self.touched = sim
        ids = self.mgr.allocate_slots(r, n, prefix, la)
        if need > len(self.model_free):
            assert ids is None, (need, len(self.model_free))
            self.ops["failed_allocation"] += 1
            if small:
                assert self.snapshot() == before
            assert self.mgr.pending_copies == []
            self.after_call()
            return None
        assert ids is not None, (need, len(self.model_free))
        self.max_used = max(self.max_used, self.usable - len(self.model_free) + need)
        table = list(old)
        if hits:
            assert not old
            for h in hits:
                if owners[h] == 0:
                    self.model_free.remove(h)
                owners[h] += 1
            table = list(hits)
        k = int(cow) + n_new
        fresh = self.model_free[:k]
        del self.model_free[:k]
        evicted = [b for b in fresh if b in self.published]
        for b in evicted:
            del self.published[b]
        assert self.pool.num_evictions - ev_before == len(evicted)
        for b in fresh:
            assert owners[b] == 0
            owners[b] = 1
        copies = self.mgr.take_pending_copies()
        if cow:
            src, dst = table[idx], fresh[0]
            assert copies == [(src, dst)]
            self.ops["copy_on_write"] += 1
            owners[src] -= 1
            assert owners[src] > 0
            table[idx] = dst
            self.mem[dst] = list(self.mem[src])
            fresh = fresh[1:]
        else:
            assert copies == []
        table.extend(fresh)
        assert ids == table
        self.tables[rid] = table
        self.after_call()
        return ids

    def write(self, sim: Sim, n: int) -> None:
        """The runner writes KV for tokens computed .. computed+n-1, then computed += n."""
        r, bs, mem = sim.req, self.bs, self.mem
        table = self.tables[r.request_id]
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
            bid = table[pos // bs]
            assert self.owners[bid] == 1, f"{r.request_id} writes token {pos} into shared {bid}"
            assert bid not in self.published, f"{r.request_id} writes into cached block {bid}"
            mem[bid][pos % bs] = sim.keys[pos]
        r.num_computed_tokens += n
        assert r.num_computed_tokens <= r.num_tokens

    def commit(self, sim: Sim) -> None:
        r = sim.req
        self.touched = sim
        self.mgr.commit(r)
        table, bs = self.tables[r.request_id], self.bs
        for i in range(min(r.num_computed_tokens // bs, len(table))):
            ident = sim.keys[(i + 1) * bs - 1]
            bid = table[i]
            if bid in self.published:
                assert self.published[bid] == ident, f"block {bid} shared by different content"
            else:
                self.published[bid] = ident
        self.after_call()

    def free(self, sim: Sim) -> None:
        rid = sim.req.request_id
        self.touched = None
        self.mgr.free(sim.req)
        table = self.tables.pop(rid, None)
        if table is not None:
            self.release(reversed(table))
        self.live.pop(rid, None)
        self.waiting.pop(rid, None)
        self.after_call()
        assert rid not in self.mgr.owned_blocks()

    def sample(self, sim: Sim, k: int = 1) -> None:
        sim.req.all_token_ids.extend(self.rng.randrange(self.vocab) for _ in range(k))
        sim.sync_keys()

    # ---- operations ---------------------------------------------------------------------------
    def new_request(self) -> None:
        rng, bs = self.rng, self.bs
        base = rng.choice(self.base)
        prompt = base[: rng.randint(0, len(base))]
        prompt += [rng.randrange(self.vocab) for _ in range(rng.randint(0, 2 * bs))]
        if not prompt:
            prompt = [rng.randrange(self.vocab)]
        salt = rng.choice([None, None, None, "a", "b"])
        adapter = rng.choice([None, None, None, 1])
        rid = f"r{self.next_id}"
        self.next_id += 1
        req = Request(rid, prompt, max_tokens=1, cache_salt=salt, adapter_id=adapter)
        sim = Sim(req, len(prompt) + rng.randint(1, 3 * bs))
        self.waiting[rid] = sim
        self.admit(sim)

    def admit(self, sim: Sim) -> None:
        r, bs, rng = sim.req, self.bs, self.rng
        assert r.num_computed_tokens == 0
        self.touched = None
        m = self.mgr.match_prefix(r)
        self.after_call()
        hits = m.blocks
        assert m.num_tokens == len(hits) * bs
        assert len(hits) <= (r.num_tokens - 1) // bs
        for i, block in enumerate(hits):
            assert self.mem[block.block_id] == sim.keys[i * bs : (i + 1) * bs], (
                f"{r.request_id}: prefix hit on block {block.block_id} holds foreign KV"
            )
            assert self.published.get(block.block_id) == sim.keys[(i + 1) * bs - 1]
        assert len(hits) == self.longest_cached(sim)
        remaining = r.num_tokens - m.num_tokens
        n = remaining if rng.random() < 0.6 else rng.randint(1, remaining)
        la = rng.choice((0, 0, 0, 1, 2, bs))
        ids = self.allocate(sim, n, m, la)
        if ids is None:
            return
        del self.waiting[r.request_id]
        self.live[r.request_id] = sim
        r.num_computed_tokens = m.num_tokens
        self.write(sim, n)
        self.finish_step(sim)

    def finish_step(self, sim: Sim) -> None:
        r = sim.req
        if self.rng.random() < 0.8:
            self.commit(sim)
        if r.num_computed_tokens == r.num_tokens:
            if r.num_tokens >= sim.max_len:
                self.ops["finish"] += 1
                self.free(sim)
            elif self.rng.random() < 0.9:
                self.sample(sim)

    def step(self, sim: Sim) -> None:
        r, bs, rng = sim.req, self.bs, self.rng
        if r.num_computed_tokens == r.num_tokens:
            self.sample(sim)
        remaining = r.num_tokens - r.num_computed_tokens
        n = 1 if remaining == 1 else rng.randint(1, min(remaining, 3 * bs))
        la = rng.choice((0, 0, 0, 1, 2, bs))
        if self.allocate(sim, n, None, la) is None:
            victim = self.live[rng.choice(sorted(self.live))]  # like the scheduler: make room
            self.ops["preempt_on_oom"] += 1
            self.preempt(victim)
            return
        self.write(sim, n)
        self.finish_step(sim)

    def preempt(self, sim: Sim) -> None:
        self.free(sim)
        sim.req.num_computed_tokens = 0
        self.waiting[sim.req.request_id] = sim

    def fork(self, parent: Sim) -> None:
        p = parent.req
        if self.rng.random() < 0.3:
            self.trim(parent, p.num_computed_tokens)  # drop lookahead slots before forking
        rid = f"r{self.next_id}"
        self.next_id += 1
        child = Request(
            rid, list(p.prompt_token_ids), 1, cache_salt=p.cache_salt, adapter_id=p.adapter_id
        )
        child.all_token_ids = list(p.all_token_ids)
        if p.num_tokens == p.num_computed_tokens + 1 and self.vocab > 1:
            # The child samples its own, different last token.
            child.all_token_ids[-1] = (p.all_token_ids[-1] + 1) % self.vocab
        csim = Sim(child, parent.max_len)
        # Only the blocks holding computed tokens are shared; lookahead blocks past them stay
        # the parent's (both sides would write there).
        table = self.tables[p.request_id][: cdiv(p.num_computed_tokens, self.bs)]
        self.touched = csim
        self.live[rid] = csim
        self.mgr.fork(p, child)
        assert child.num_computed_tokens == p.num_computed_tokens
        for bid in table:
            self.owners[bid] += 1
        self.tables[rid] = list(table)
        self.after_call()

    def trim(self, sim: Sim, num_tokens: int) -> None:
        rid = sim.req.request_id
        self.touched = sim
        self.mgr.trim(sim.req, num_tokens)
        table = self.tables[rid]
        keep = cdiv(num_tokens, self.bs)  # >= every committed block: num_tokens >= computed
        if keep < len(table):
            extra = table[keep:]
            del table[keep:]
            self.release(reversed(extra))
        self.after_call()

    def reset_prefix_cache(self) -> None:
        cached_free = {b for b in self.model_free if b in self.published}
        self.touched = None
        assert self.pool.reset_prefix_cache() == len(cached_free)
        for b in cached_free:
            del self.published[b]
        order = [b.block_id for b in self.pool.iter_free()]
        assert sorted(order) == sorted(self.model_free)
        self.model_free = order  # all plain now; their relative order is not specified
        self.after_call()

    def random_op(self) -> None:
        rng = self.rng
        live = sorted(self.live)
        waiting = sorted(self.waiting)
        total = len(live) + len(waiting)
        x = rng.random()
        if x < 0.12 and total < self.max_reqs or total == 0:
            self.ops["new"] += 1
            self.new_request()
        elif x < 0.22 and waiting:
            self.ops["admit"] += 1
            self.admit(self.waiting[rng.choice(waiting)])
        elif x < 0.60 and live:
            self.ops["step"] += 1
            self.step(self.live[rng.choice(live)])
        elif x < 0.67 and live:
            self.ops["append"] += 1
            sim = self.live[rng.choice(live)]
            self.sample(sim, rng.randint(1, 3))
            self.step(sim)
        elif x < 0.73 and live:
            self.ops["commit"] += 1
            self.commit(self.live[rng.choice(live)])
        elif x < 0.79 and live:
            self.ops["preempt"] += 1
            self.preempt(self.live[rng.choice(live)])
        elif x < 0.85 and total:
            self.ops["abort"] += 1
            self.free({**self.live, **self.waiting}[rng.choice(live + waiting)])
        elif x < 0.92 and live and total < self.max_reqs:
            parent = self.live[rng.choice(live)]
            if parent.req.num_computed_tokens > 0:
                self.ops["fork"] += 1
                self.fork(parent)
        elif x < 0.985 and live:
            self.ops["trim"] += 1
            sim = self.live[rng.choice(live)]
            self.trim(sim, sim.req.num_computed_tokens + rng.randint(0, self.bs))
        elif x >= 0.985:
            self.ops["reset"] += 1
            self.reset_prefix_cache()

    def drain(self) -> None:
        for sim in [*self.live.values(), *self.waiting.values()]:
            self.free(sim)
        assert not self.live and not self.waiting and not self.tables
        assert self.mgr.owned_blocks() == {}
        assert self.pool.num_free == self.nb - 1
        assert [b.ref_cnt for b in self.pool.blocks] == [1] + [0] * (self.nb - 1)
        assert sorted(b.block_id for b in self.pool.iter_free()) == list(range(1, self.nb))
        self.mgr.check_integrity()

    def run(self, num_ops: int) -> int:
        for _ in range(num_ops):
            self.random_op()
            self.num_ops += 1
        self.drain()
        return self.num_ops


# (num_blocks, block_size, algo, operations, check period in manager calls). Exhaustive checks
# run after every manager call on pools of up to 32 blocks; bigger pools (O(num_blocks) per
# check) are checked every few calls, and their allocations are still verified against the model
# on every call.
CONFIGS = [
    (2, 1, "sha256", 4000, 1),
    (2, 4, "const", 3000, 1),
    (2, 16, "fast", 2000, 1),
    (3, 1, "const", 4000, 1),
    (4, 4, "fast", 6000, 1),
    (5, 16, "sha256", 4000, 1),
    (8, 1, "sha256", 10000, 1),
    (8, 4, "const", 12000, 1),
    (12, 16, "fast", 6000, 1),
    (16, 4, "sha256", 12000, 1),
    (16, 1, "fast", 8000, 1),
    (32, 4, "const", 8000, 1),
    (32, 16, "sha256", 5000, 1),
    (64, 4, "fast", 6000, 2),
    (64, 16, "sha256", 3000, 2),
    (128, 4, "const", 3000, 4),
    (256, 16, "fast", 2500, 8),
    (1024, 16, "sha256", 1500, 24),
    (1024, 1, "fast", 1000, 24),
    (1024, 4, "const", 1000, 24),
]
TOTAL_OPS = sum(c[3] for c in CONFIGS)


def test_fuzz_budget():
    assert TOTAL_OPS >= 100_000
    assert {c[1] for c in CONFIGS} == {1, 4, 16}
    assert {c[2] for c in CONFIGS} == {"sha256", "fast", "const"}
    assert min(c[0] for c in CONFIGS) == 2 and max(c[0] for c in CONFIGS) == 1024


@pytest.mark.parametrize(
    "num_blocks,block_size,algo,num_ops,check_every",
    CONFIGS,
    ids=[f"{c[0]}x{c[1]}-{c[2]}" for c in CONFIGS],
)
def test_kv_cache_fuzz(num_blocks, block_size, algo, num_ops, check_every):
    seed = zlib.crc32(f"{num_blocks}x{block_size}-{algo}".encode())  # stable across runs
    fz = KVFuzzer(seed, num_blocks, block_size, algo, check_every)
    done = fz.run(num_ops)
    assert done == num_ops
    assert fz.num_integrity_checks >= fz.num_mgr_calls // check_every
    # The run must have exercised the interesting paths, not just failed admissions.
    for op in ("new", "step", "commit", "preempt", "abort", "fork", "trim"):
        assert fz.ops[op] > 0, (op, dict(fz.ops))
    assert fz.mgr.stats.hits > 0
    if num_blocks <= 64:
        assert fz.pool.num_evictions > 0


# ---- hypothesis: the same model, driven rule by rule (bounded) --------------------------------

SMALL = [(2, 1, "sha256"), (4, 2, "const"), (6, 4, "fast"), (9, 1, "sha256"), (12, 4, "const")]
SEEDS = st.integers(0, 2**32 - 1)


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(cfg=st.sampled_from(SMALL), seed=SEEDS)
    def setup(self, cfg, seed):
        self.fz = KVFuzzer(seed, *cfg)

    def _pick(self, pool: dict, seed: int):
        return pool[sorted(pool)[seed % len(pool)]] if pool else None

    @rule(seed=SEEDS)
    def new(self, seed):
        self.fz.rng.seed(seed)
        if len(self.fz.live) + len(self.fz.waiting) < self.fz.max_reqs:
            self.fz.new_request()

    @rule(seed=SEEDS)
    def admit(self, seed):
        sim = self._pick(self.fz.waiting, seed)
        if sim is not None:
            self.fz.rng.seed(seed)
            self.fz.admit(sim)

    @rule(seed=SEEDS, k=st.integers(0, 3))
    def step(self, seed, k):
        sim = self._pick(self.fz.live, seed)
        if sim is not None:
            self.fz.rng.seed(seed)
            if k:
                self.fz.sample(sim, k)
            self.fz.step(sim)

    @rule(seed=SEEDS)
    def commit(self, seed):
        sim = self._pick(self.fz.live, seed)
        if sim is not None:
            self.fz.commit(sim)

    @rule(seed=SEEDS)
    def preempt(self, seed):
        sim = self._pick(self.fz.live, seed)
        if sim is not None:
            self.fz.preempt(sim)

    @rule(seed=SEEDS)
    def abort(self, seed):
        sim = self._pick({**self.fz.live, **self.fz.waiting}, seed)
        if sim is not None:
            self.fz.free(sim)

    @rule(seed=SEEDS)
    def fork(self, seed):
        sim = self._pick(self.fz.live, seed)
        fz = self.fz
        if (
            sim is not None
            and sim.req.num_computed_tokens > 0
            and len(fz.live) + len(fz.waiting) < fz.max_reqs
        ):
            fz.fork(sim)

    @rule(seed=SEEDS, extra=st.integers(0, 4))
    def trim(self, seed, extra):
        sim = self._pick(self.fz.live, seed)
        if sim is not None:
            self.fz.trim(sim, sim.req.num_computed_tokens + extra)

    @rule()
    def reset(self):
        self.fz.reset_prefix_cache()

    @invariant()
    def consistent(self):
        if hasattr(self, "fz"):
            self.fz.mgr.check_integrity()
            self.fz.check_model()

    def teardown(self):
        if hasattr(self, "fz"):
            self.fz.drain()


KVCacheMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_cache_state_machine = KVCacheMachine.TestCase
