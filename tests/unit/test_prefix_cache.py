"""Prefix cache: matching, commit gating, salts/adapters, hash algorithms, forced collisions,
fork with copy-on-write, and trim.

Hits are checked against a shadow KV: every slot a test writes records the identity of the KV
it holds, ``(cache_salt, adapter_id, tokens[:p + 1])`` (a token's KV depends on everything
before it). A prefix hit is correct only if every slot of every hit block holds exactly the KV
the request would have computed itself.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import KVCacheManager, PrefixMatch
from layerzero_serve.types import Request

ALGOS = ["sha256", "fast", "const"]


def const_hash(parent, token_ids):
    return 0  # every block collides with every other one


def make(algo: str, num_blocks: int = 64, block_size: int = 4, **kw) -> KVCacheManager:
    if algo == "const":
        return KVCacheManager(num_blocks, block_size, hash_fn=const_hash, **kw)
    return KVCacheManager(num_blocks, block_size, hash_algo=algo, **kw)


def req(rid: str, tokens, salt=None, adapter=None) -> Request:
    return Request(rid, list(tokens), max_tokens=64, cache_salt=salt, adapter_id=adapter)


def ids_of(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def free_ids(mgr: KVCacheManager) -> list[int]:
    return [b.block_id for b in mgr.pool.iter_free()]


class ShadowKV:
    """Drives a manager like a runner would and remembers what each physical slot holds."""

    def __init__(self, mgr: KVCacheManager) -> None:
        self.mgr = mgr
        self.bs = mgr.block_size
        self.slots: dict[tuple[int, int], tuple] = {}

    @staticmethod
    def key(r: Request, pos: int) -> tuple:
        return (r.cache_salt, r.adapter_id, tuple(r.all_token_ids[: pos + 1]))

    def check_hits(self, r: Request, prefix: PrefixMatch) -> None:
        assert prefix.num_tokens == len(prefix.blocks) * self.bs
        assert prefix.num_tokens < r.num_tokens  # never the last known token
        for i, block in enumerate(prefix.blocks):
            for off in range(self.bs):
                pos = i * self.bs + off
                assert self.slots.get((block.block_id, off)) == self.key(r, pos), (
                    f"{r.request_id}: hit block {block.block_id} slot {off} holds foreign KV"
                )

    def check_request(self, r: Request) -> None:
        ids = self.mgr.block_ids(r.request_id)
        for pos in range(r.num_computed_tokens):
            got = self.slots.get((ids[pos // self.bs], pos % self.bs))
            assert got == self.key(r, pos), f"{r.request_id}: token {pos} lost its KV"

    def step(
        self,
        r: Request,
        n: int,
        prefix: PrefixMatch | None = None,
        lookahead: int = 0,
        commit: bool = True,
    ) -> list[int]:
        ids = self.mgr.allocate_slots(r, n, prefix, lookahead)
        assert ids is not None
        if prefix is not None:
            self.check_hits(r, prefix)
            r.num_computed_tokens = prefix.num_tokens
        for src, dst in self.mgr.take_pending_copies():
            for off in range(self.bs):
                if (src, off) in self.slots:
                    self.slots[(dst, off)] = self.slots[(src, off)]
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
            bid = ids[pos // self.bs]
            block = self.mgr.pool.blocks[bid]
            assert block.ref_cnt == 1, f"{r.request_id} writes token {pos} into shared {block}"
            assert block.block_hash is None, f"{r.request_id} writes into cached {block}"
            self.slots[(bid, pos % self.bs)] = self.key(r, pos)
        r.num_computed_tokens += n
        if commit:
            self.mgr.commit(r)
        self.mgr.check_integrity()
        self.check_request(r)
        return list(ids)

    def admit(self, r: Request, n: int | None = None, commit: bool = True, lookahead: int = 0):
        m = self.mgr.match_prefix(r)
        self.check_hits(r, m)
        n = r.num_tokens - m.num_tokens if n is None else n
        ids = self.step(r, n, m, lookahead, commit)
        return m, ids


# ---- match_prefix basics --------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("bs", [1, 2, 4])
def test_match_never_covers_last_token(algo, bs):
    mgr = make(algo, block_size=bs)
    kv = ShadowKV(mgr)
    base = [100 + i for i in range(3 * bs)]
    a = req("A", base)
    _, ids_a = kv.admit(a)
    assert ids_a == [1, 2, 3]
    for length in range(1, 3 * bs + 3):
        toks = base[:length] + [7] * max(0, length - 3 * bs)
        r = req(f"q{length}", toks)
        m = mgr.match_prefix(r)
        want_blocks = min(3, (length - 1) // bs)
        assert ids_of(m.blocks) == ids_a[:want_blocks], length
        assert m.num_tokens == want_blocks * bs
        kv.check_hits(r, m)


@pytest.mark.parametrize("algo", ALGOS)
def test_prompt_of_exactly_two_blocks_matches_one(algo):
    mgr = make(algo, block_size=4)
    kv = ShadowKV(mgr)
    a = req("A", range(8))
    kv.admit(a)
    assert all(mgr.pool.blocks[i].block_hash is not None for i in (1, 2))
    b = req("B", range(8))
    m, ids = kv.admit(b)
    assert ids_of(m.blocks) == [1] and m.num_tokens == 4
    assert ids == [1, 3]  # recomputes its last block (and with it the last token)
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [2, 1, 1]


@pytest.mark.parametrize("algo", ALGOS)
def test_block_enters_cache_only_after_commit(algo):
    mgr = make(algo, block_size=4)
    kv = ShadowKV(mgr)
    a = req("A", range(9))
    m, ids = kv.admit(a, n=5, commit=False)  # chunked prefill: tokens 0..4 computed
    assert m.num_tokens == 0 and ids == [1, 2]
    assert a.num_computed_tokens == 5
    assert mgr.match_prefix(req("B0", range(9))).num_tokens == 0  # KV written, not published
    mgr.commit(a)
    mgr.check_integrity()
    assert [mgr.pool.blocks[i].block_hash is None for i in (1, 2)] == [False, True]
    assert ids_of(mgr.match_prefix(req("B1", range(9))).blocks) == [1]
    kv.step(a, 3, commit=False)  # tokens 5..7: block 2 is full but not committed
    assert a.num_computed_tokens == 8
    assert ids_of(mgr.match_prefix(req("B2", range(9))).blocks) == [1]
    mgr.commit(a)
    mgr.check_integrity()
    b = req("B3", range(9))
    m = mgr.match_prefix(b)
    assert ids_of(m.blocks) == [1, 2] and m.num_tokens == 8
    kv.check_hits(b, m)


def test_commit_before_allocation_is_a_no_op():
    mgr = make("sha256")
    r = req("R", range(8))
    r.num_computed_tokens = 8
    mgr.commit(r)
    assert mgr.pool.cached == {}
    assert "R" not in mgr.owned_blocks()
    mgr.check_integrity()


def test_prefix_caching_disabled():
    mgr = make("sha256", enable_prefix_caching=False)
    kv = ShadowKV(mgr)
    kv.admit(req("A", range(9)))
    assert mgr.pool.cached == {}
    assert all(b.block_hash is None for b in mgr.pool.blocks)
    m = mgr.match_prefix(req("B", range(9)))
    assert m.blocks == [] and m.num_tokens == 0
    assert (mgr.stats.queries, mgr.stats.hits, mgr.stats.hit_rate) == (0, 0, 0.0)


def test_stats_count_queried_and_hit_tokens():
    mgr = make("sha256", block_size=4)
    kv = ShadowKV(mgr)
    kv.admit(req("A", range(9)))
    assert (mgr.stats.queries, mgr.stats.hits) == (9, 0)
    kv.admit(req("B", range(9)))
    assert (mgr.stats.queries, mgr.stats.hits) == (18, 8)
    mgr.match_prefix(req("C", [0, 1, 2, 3, 4]))
    assert (mgr.stats.queries, mgr.stats.hits) == (23, 12)
    mgr.match_prefix(req("D", [0]))
    assert (mgr.stats.queries, mgr.stats.hits) == (24, 12)
    assert mgr.stats.hit_rate == pytest.approx(12 / 24)


def test_stats_only_when_recorded():
    mgr = make("sha256", block_size=4)
    kv = ShadowKV(mgr)
    kv.admit(req("A", range(9)))
    q, h = mgr.stats.queries, mgr.stats.hits
    m = mgr.match_prefix(req("B", range(9)), record_stats=False)
    assert m.num_tokens == 8
    assert (mgr.stats.queries, mgr.stats.hits) == (q, h)
    mgr.record_prefix_lookup(9, 8)
    assert (mgr.stats.queries, mgr.stats.hits) == (q + 9, h + 8)
    off = make("sha256", enable_prefix_caching=False)
    off.record_prefix_lookup(9, 8)
    assert (off.stats.queries, off.stats.hits) == (0, 0)


# ---- salts, adapters and hash algorithms ----------------------------------------------------

KEY_PAIRS = [
    ((None, None), (None, None)),
    (("x", None), ("x", None)),
    (("x", None), ("y", None)),
    ((None, None), ("x", None)),
    (("", None), (None, None)),
    (("ab", None), ("a", None)),
    (("a", None), ("ab", None)),
    ((None, 1), (None, 1)),
    ((None, 1), (None, 2)),
    ((None, None), (None, 0)),
    ((None, 0), ("", None)),
    (("x", 1), ("x", 1)),
    (("x", 1), ("x", 2)),
    (("x", 1), ("y", 1)),
    (("x", 1), (None, 1)),
]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("key_a,key_b", KEY_PAIRS)
def test_salt_and_adapter_isolation(algo, key_a, key_b):
    mgr = make(algo, block_size=2)
    kv = ShadowKV(mgr)
    toks = [5, 6, 7, 8, 9]
    a = req("A", toks, *key_a)
    _, ids_a = kv.admit(a)
    b = req("B", toks, *key_b)
    m, ids_b = kv.admit(b)
    if key_a == key_b:
        assert ids_of(m.blocks) == ids_a[:2]
        assert ids_b[:2] == ids_a[:2]
    else:
        assert m.blocks == []
        assert not set(ids_a) & set(ids_b)
    kv.check_request(a)
    kv.check_request(b)
    # A third request with B's keys hits B's (or the shared) blocks, never the other's.
    c = req("C", toks, *key_b)
    m = mgr.match_prefix(c)
    assert ids_of(m.blocks) == ids_b[:2]
    kv.check_hits(c, m)


def _sha_le(parent: bytes, values) -> bytes:
    return hashlib.sha256(parent + struct.pack(f"<{len(values)}q", *values)).digest()


def test_sha256_chain_matches_spec():
    """Documented: SHA-256 over the parent digest and the token ids as little-endian int64,
    chained from the root."""
    mgr = make("sha256", block_size=3)
    kv = ShadowKV(mgr)
    toks = [1, -2, 3, 2**40, 5, 6, 7]
    r = req("R", toks)
    kv.admit(r)
    root = hashlib.sha256(b"layerzero_serve/prefix-root/v1").digest()
    h0 = _sha_le(root, toks[0:3])
    h1 = _sha_le(h0, toks[3:6])
    assert r.block_hashes == [h0, h1]
    assert [mgr.pool.blocks[i].block_hash for i in (1, 2)] == [h0, h1]
    # A salted request: different first hash, same chaining rule afterwards.
    s = req("S", toks, salt="tenant")
    kv.admit(s)
    assert s.block_hashes[0] != h0
    assert s.block_hashes[1] == _sha_le(s.block_hashes[0], toks[3:6])


def test_fast_chain_matches_spec():
    mgr = make("fast", block_size=2)
    kv = ShadowKV(mgr)
    toks = [9, 8, 7, 6, 5]
    r = req("R", toks)
    kv.admit(r)
    h = r.block_hashes
    assert len(h) == 2
    assert all(isinstance(x, int) for x in h)
    assert h[1] == hash((h[0], 7, 6))


# ---- forced collisions (constant hash) ------------------------------------------------------


def test_constant_hash_requires_identical_tokens():
    mgr = make("const", block_size=4)
    kv = ShadowKV(mgr)
    a = req("A", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    _, ids_a = kv.admit(a)
    assert ids_a == [1, 2, 3]
    assert set(mgr.pool.cached) == {0} and sorted(mgr.pool.cached[0]) == [1, 2]
    cases = [
        ([9, 9, 9, 9, 5, 6, 7, 8, 9], []),  # block 1 equal, block 0 differs
        ([1, 2, 3, 4, 5, 6, 7, 0, 9], [1]),  # block 1 differs in its last token
        ([1, 2, 3, 0, 5, 6, 7, 8, 9], []),
        ([1, 2, 3, 4, 5, 6, 7, 8, 0], [1, 2]),
        ([1, 2, 3, 4, 5, 6, 7, 8], [1]),
        ([5, 6, 7, 8, 1, 2, 3, 4, 9], []),  # A's blocks in swapped order
    ]
    for i, (toks, want) in enumerate(cases):
        r = req(f"q{i}", toks)
        m = mgr.match_prefix(r)
        assert ids_of(m.blocks) == want, toks
        kv.check_hits(r, m)
    mgr.check_integrity()


@pytest.mark.parametrize("algo", ALGOS)
def test_equal_block_under_a_different_parent_is_not_a_hit(algo):
    """B's own block 0 is cached, and A's block 1 holds exactly B's block-1 tokens; B must hit
    its own block 0 and stop there: A's block 1 hangs off a different prefix."""
    mgr = make(algo, block_size=4)
    kv = ShadowKV(mgr)
    a = req("A", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    _, ids_a = kv.admit(a)
    b0 = req("B0", [9, 9, 9, 9, 0])
    _, ids_b0 = kv.admit(b0)
    assert ids_a == [1, 2, 3] and ids_b0 == [4, 5]
    b = req("B", [9, 9, 9, 9, 5, 6, 7, 8, 9])
    m, ids_b = kv.admit(b)
    assert ids_of(m.blocks) == [4]
    assert ids_b == [4, 6, 7]
    # Once B has committed its own block 1, a copy of B hits B's chain, never A's block 2.
    c = req("C", [9, 9, 9, 9, 5, 6, 7, 8, 1])
    m = mgr.match_prefix(c)
    assert ids_of(m.blocks) == [4, 6]
    kv.check_hits(c, m)
    mgr.check_integrity()


@pytest.mark.parametrize("algo", ALGOS)
def test_colliding_salts_never_share(algo):
    mgr = make(algo, block_size=2)
    kv = ShadowKV(mgr)
    toks = [3, 1, 4, 1, 5]
    kv.admit(req("A", toks, salt="s"))
    assert mgr.match_prefix(req("B", toks, salt="t")).blocks == []
    assert mgr.match_prefix(req("C", toks)).blocks == []
    assert mgr.match_prefix(req("D", toks, salt="s", adapter=3)).blocks == []
    assert ids_of(mgr.match_prefix(req("E", toks, salt="s")).blocks) == [1, 2]


@pytest.mark.parametrize("algo", ALGOS)
def test_duplicate_chains_still_give_the_longest_hit(algo):
    """Documented: match_prefix returns the *longest* chain of cached blocks equal to the
    request's leading blocks. X computes block 0 of a prompt and commits only that block; Y,
    admitted before X committed, computes blocks 0 and 1 of the same prompt. Both chains are
    cached and content-correct, so a third copy of Y's prompt must hit 2 blocks."""
    mgr = make(algo, block_size=4)
    kv = ShadowKV(mgr)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    x = req("X", prompt[:5])
    y = req("Y", prompt)
    mx = mgr.match_prefix(x)
    my = mgr.match_prefix(y)
    assert mx.blocks == [] and my.blocks == []
    ids_x = kv.step(x, 5, mx, commit=False)
    ids_y = kv.step(y, 9, my, commit=False)
    assert ids_x == [1, 2] and ids_y == [3, 4, 5]
    mgr.commit(x)  # caches block 1 (tokens 1..4)
    mgr.commit(y)  # caches blocks 3 (tokens 1..4, a duplicate of 1) and 4 (tokens 5..8)
    mgr.check_integrity()
    z = req("Z", prompt)
    m = mgr.match_prefix(z)
    kv.check_hits(z, m)
    assert m.num_tokens == 8, ids_of(m.blocks)


# ---- fork and copy-on-write -----------------------------------------------------------------


def _forked():
    mgr = make("sha256", num_blocks=16, block_size=4)
    kv = ShadowKV(mgr)
    p = req("P", [1, 2, 3, 4, 5, 6])
    _, ids = kv.admit(p)
    assert ids == [1, 2]
    p.all_token_ids.append(70)  # P's sampled token
    c = req("C", [1, 2, 3, 4, 5, 6])
    c.all_token_ids.append(80)  # the child's own sample
    mgr.fork(p, c)
    mgr.check_integrity()
    assert mgr.block_ids("C") == [1, 2]
    assert mgr.block_ids("C") is not mgr.block_ids("P")
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2)] == [2, 2]
    assert c.num_computed_tokens == 6
    assert c.block_hashes == p.block_hashes and c.block_hashes is not p.block_hashes
    kv.check_request(c)
    return mgr, kv, p, c


def test_fork_parent_writes_first_gets_private_copy():
    mgr, kv, p, c = _forked()
    ids_p = mgr.allocate_slots(p, 1)
    assert ids_p == [1, 3]
    assert mgr.block_ids("C") == [1, 2]
    assert mgr.pending_copies == [(2, 3)]
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [2, 1, 1]
    mgr.check_integrity()
    assert mgr.take_pending_copies() == [(2, 3)]
    assert mgr.take_pending_copies() == []
    # The child now owns block 2 alone: no copy when it writes.
    ids_c = mgr.allocate_slots(c, 1)
    assert ids_c == [1, 2]
    assert mgr.take_pending_copies() == []
    mgr.check_integrity()


def test_fork_child_writes_first_gets_private_copy():
    mgr, kv, p, c = _forked()
    kv.step(c, 1)
    assert mgr.block_ids("C") == [1, 3]
    assert mgr.block_ids("P") == [1, 2]
    kv.step(p, 1)
    assert mgr.block_ids("P") == [1, 2]
    kv.check_request(p)
    kv.check_request(c)
    assert kv.slots[(2, 2)] == ShadowKV.key(p, 6) != kv.slots[(3, 2)] == ShadowKV.key(c, 6)


def test_fork_copy_and_new_block_in_one_allocation():
    mgr, kv, p, c = _forked()
    p.all_token_ids.extend([71, 72])  # 9 tokens; positions 6, 7, 8 to compute
    ids = mgr.allocate_slots(p, 3)
    assert ids == [1, 3, 4]  # the private copy is taken before the new block
    assert mgr.take_pending_copies() == [(2, 3)]
    assert mgr.block_ids("C") == [1, 2]
    mgr.check_integrity()


def test_fork_at_block_boundary_copies_nothing():
    mgr = make("sha256", num_blocks=16, block_size=4)
    kv = ShadowKV(mgr)
    p = req("P", range(8))
    kv.admit(p)
    p.all_token_ids.append(50)
    c = req("C", range(8))
    c.all_token_ids.append(60)
    mgr.fork(p, c)
    assert mgr.block_ids("C") == [1, 2]
    assert kv.step(p, 1) == [1, 2, 3]
    assert kv.step(c, 1) == [1, 2, 4]
    assert mgr.take_pending_copies() == []
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    mgr.free(p)
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [1, 1, 0, 1]
    mgr.free(c)
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [0, 0, 0, 0]
    mgr.check_integrity()
    assert mgr.num_free_blocks == 15


def test_copy_on_write_counts_against_free_space():
    mgr = make("sha256", num_blocks=3, block_size=4)
    kv = ShadowKV(mgr)
    p = req("P", [1, 2, 3, 4, 5, 6])
    kv.admit(p)
    p.all_token_ids.append(7)
    c = req("C", [1, 2, 3, 4, 5, 6, 8])
    mgr.fork(p, c)
    assert mgr.num_free_blocks == 0
    before = (
        free_ids(mgr),
        [(b.ref_cnt, b.block_hash, b.gen) for b in mgr.pool.blocks],
        {r: list(mgr.block_ids(r)) for r in mgr.owned_blocks()},
    )
    assert mgr.allocate_slots(p, 1) is None  # needs a private copy; no block free
    after = (
        free_ids(mgr),
        [(b.ref_cnt, b.block_hash, b.gen) for b in mgr.pool.blocks],
        {r: list(mgr.block_ids(r)) for r in mgr.owned_blocks()},
    )
    assert after == before
    assert mgr.take_pending_copies() == []
    mgr.free(c)
    assert kv.step(p, 1) == [1, 2]  # sole owner again: writes in place
    assert mgr.take_pending_copies() == []


def test_fork_into_registered_child_is_rejected():
    mgr = make("sha256")
    kv = ShadowKV(mgr)
    p = req("P", range(5))
    kv.admit(p)
    c = req("C", range(5))
    mgr.fork(p, c)
    with pytest.raises(ValidationError) as ei:
        mgr.fork(p, c)
    assert ei.value.param == "child.request_id"
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2)] == [2, 2]
    mgr.check_integrity()


@pytest.mark.parametrize(
    "prompt_len,lookahead,new_tokens",
    [
        (4, 2, 1),  # lookahead slot block allocated before the fork, block-aligned
        (6, 4, 3),  # partial block + a lookahead block the write spills into
    ],
)
def test_fork_never_shares_a_block_that_gets_written(prompt_len, lookahead, new_tokens):
    """A step allocated with lookahead slots leaves empty blocks past the computed tokens.
    After a fork, parent and child diverge: no block either of them writes may stay shared."""
    bs = 4
    mgr = make("sha256", num_blocks=16, block_size=bs)
    p = req("P", range(prompt_len))
    ids = mgr.allocate_slots(p, prompt_len, mgr.match_prefix(p), lookahead)
    want_blocks = -(-(prompt_len + lookahead) // bs)
    assert ids == list(range(1, want_blocks + 1))
    p.num_computed_tokens = prompt_len
    mgr.commit(p)
    c = req("C", range(prompt_len))
    p.all_token_ids.extend(range(100, 100 + new_tokens))
    c.all_token_ids.extend(range(200, 200 + new_tokens))
    mgr.fork(p, c)
    ids_p = list(mgr.allocate_slots(p, new_tokens))
    mgr.take_pending_copies()
    ids_c = list(mgr.allocate_slots(c, new_tokens))
    mgr.check_integrity()
    for pos in range(prompt_len, prompt_len + new_tokens):
        bp, bc = ids_p[pos // bs], ids_c[pos // bs]
        assert bp != bc, f"P and C both write token {pos} (different tokens) into block {bp}"


# ---- trim -----------------------------------------------------------------------------------


def test_trim_drops_lookahead_blocks_tail_first():
    mgr = make("sha256", num_blocks=16, block_size=4)
    r = req("R", [1, 2])
    assert mgr.allocate_slots(r, 2, None, 9) == [1, 2, 3]
    r.num_computed_tokens = 2
    mgr.trim(r, 2)
    assert mgr.block_ids("R") == [1]
    assert free_ids(mgr)[:3] == [2, 3, 4]
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [1, 0, 0]
    mgr.check_integrity()
    o = req("O", range(5))
    assert mgr.allocate_slots(o, 5) == [2, 3]


@pytest.mark.parametrize(
    "keep_tokens,want",
    [(0, []), (1, [1]), (4, [1]), (5, [1, 2]), (9, [1, 2, 3]), (12, [1, 2, 3]), (40, [1, 2, 3])],
)
def test_trim_keeps_what_num_tokens_needs(keep_tokens, want):
    mgr = make("sha256", num_blocks=16, block_size=4)
    r = req("R", [1])
    assert mgr.allocate_slots(r, 1, None, 11) == [1, 2, 3]  # 12 slots, nothing committed
    mgr.trim(r, keep_tokens)
    assert mgr.block_ids("R") == want
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [int(i in want) for i in (1, 2, 3)]
    assert mgr.num_free_blocks == 15 - len(want)
    mgr.check_integrity()


def test_trim_never_drops_committed_blocks():
    mgr = make("sha256", num_blocks=16, block_size=4)
    kv = ShadowKV(mgr)
    r = req("R", range(9))
    _, ids = kv.admit(r, lookahead=4)  # 13 slots -> 4 blocks; blocks 1, 2 committed
    assert ids == [1, 2, 3, 4]
    mgr.trim(r, 0)
    assert mgr.block_ids("R") == [1, 2]
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [1, 1, 0, 0]
    assert free_ids(mgr)[:2] == [3, 4]
    mgr.check_integrity()
    mgr.trim(req("unknown", [1]), 0)  # no-op
    mgr.check_integrity()


def test_trim_never_drops_prefix_hit_blocks():
    mgr = make("sha256", num_blocks=16, block_size=4)
    kv = ShadowKV(mgr)
    kv.admit(req("A", range(9)))  # blocks 1, 2 cached
    b = req("B", range(10))
    m, ids = kv.admit(b, n=1, commit=False)  # hits blocks 1, 2; computes token 8 only
    assert ids_of(m.blocks) == [1, 2] and ids == [1, 2, 4]
    assert b.num_computed_tokens == 9
    mgr.trim(b, 0)  # the hit blocks count as committed: only block 4 may go
    assert mgr.block_ids("B") == [1, 2]
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 4)] == [2, 2, 0]  # A holds 1, 2 too
    mgr.check_integrity()


def test_trim_of_forked_child_only_drops_its_reference():
    mgr = make("sha256", num_blocks=16, block_size=4)
    kv = ShadowKV(mgr)
    p = req("P", range(6))
    kv.admit(p)
    c = req("C", range(6))
    mgr.fork(p, c)
    mgr.trim(c, 4)
    assert mgr.block_ids("C") == [1]
    assert mgr.block_ids("P") == [1, 2]
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2)] == [2, 1]
    assert 2 not in free_ids(mgr)
    mgr.check_integrity()


def test_fork_of_a_prefix_shares_its_blocks_and_copies_the_partial_one_on_write():
    """``fork(parent, child, num_tokens)``: the child gets the blocks of the parent's first
    ``num_tokens`` computed tokens (prompt sharing forks at prompt_len - 1: the child computes
    the last prompt token itself); both sides copy the shared partial block on their write."""
    mgr = make("sha256", num_blocks=16, block_size=4)
    kv = ShadowKV(mgr)
    p = req("P", range(7))
    assert kv.admit(p)[1] == [1, 2]  # 7 prompt tokens computed
    p.all_token_ids.append(70)
    c = req("C", range(7))
    mgr.fork(p, c, 6)
    assert mgr.block_ids("C") == [1, 2] and c.num_computed_tokens == 6
    assert c.block_hashes == p.block_hashes[:1]  # only the full block's hash
    mgr.check_integrity()
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2)] == [2, 2]
    assert kv.step(c, 1) == [1, 3]  # writes position 6 into a private copy of block 2
    assert [mgr.pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [2, 1, 1]
    kv.check_request(c)  # the copy carried positions 4, 5 (the shadow copies what it is told)
    assert kv.step(p, 1) == [1, 2]  # block 2 is P's alone again: no copy
    kv.check_request(p)
    mgr.free(p)
    mgr.free(c)
    mgr.check_integrity()
    assert mgr.block_usage()["used"] == 0


@pytest.mark.parametrize("bad", [-1, 8, 2.0, "3", True])
def test_fork_num_tokens_is_validated(bad):
    mgr = make("sha256", num_blocks=16, block_size=4)
    kv = ShadowKV(mgr)
    p = req("P", range(7))
    kv.admit(p)
    c = req("C", range(7))
    with pytest.raises(ValidationError) as ei:
        mgr.fork(p, c, bad)
    assert ei.value.param == "num_tokens"
    assert mgr.block_ids("C") == []
    mgr.check_integrity()
