"""The KV cache interface the scheduler sees: prefix matching, slot allocation, commit, free.

Owns the block pool and, per request, its list of blocks. The scheduler never touches blocks
directly; it asks:

* ``match_prefix(request)``: longest run of cached full blocks (never the last known token);
* ``allocate_slots(request, n, hits, lookahead)``: room for ``n`` new tokens; atomic;
* ``commit(request)``: publish blocks that became full once their KV was written;
* ``free(request)`` and ``fork(parent, child)``;
* ``check_integrity()`` for tests and debugging.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache._block_pool import Block, BlockPool, check_num_blocks
from layerzero_serve.kv_cache._checks import (
    MAX_TOKENS,
    check_counts,
    check_request,
    check_request_id,
    check_tokens,
)
from layerzero_serve.kv_cache._hashing import BlockHashFn, resolve_hash_fn, root_hash
from layerzero_serve.kv_cache.protocol import BlockTable, KVStepChanges
from layerzero_serve.types import Request


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(slots=True)
class PrefixMatch:
    """Result of ``match_prefix``: blocks to reuse and the tokens they cover."""

    blocks: list[Block]
    num_tokens: int


_NO_MATCH = PrefixMatch([], 0)


class _Table(BlockTable):
    """The manager's one record of a request's blocks: the list itself holds the block ids (the
    handle the scheduler and the runner read), ``blocks`` the Block objects in the same order,
    ``num_committed`` the leading blocks already published to the prefix cache, ``request``
    the request it belongs to (read by the integrity check)."""

    __slots__ = ("blocks", "num_committed", "request")

    def __init__(self, request: Request) -> None:
        super().__init__()
        self.blocks: list[Block] = []
        self.num_committed = 0
        self.request = request


MAX_BLOCK_SIZE = 1 << 16  # tokens per block


class KVCacheManager:
    """Block bookkeeping for all requests.

    Args:
        num_blocks: blocks in the pool, including the reserved null block, in [2, 2**24].
        block_size: tokens per block, in [1, 2**16].
        enable_prefix_caching: share full blocks between requests with equal prefixes (a bool).
        hash_algo: ``"sha256"`` (default) or ``"fast"`` (64-bit, tokens verified on every hit).
        hash_fn: optional custom ``(parent, token_ids) -> hashable``; always verified on hits.

    Every method checks its arguments (a ``Request`` where one is expected, token counts as
    ints in ``[0, 2**31 - 1]``) and raises a ValidationError naming the parameter, with nothing
    changed, on a bad one.

    CUDA graphs: host only (block ids, reference counts, hashes); nothing here touches the device.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        hash_algo: str = "sha256",
        hash_fn: BlockHashFn | None = None,
    ) -> None:
        if (
            isinstance(block_size, bool)
            or not isinstance(block_size, numbers.Integral)
            or not 1 <= block_size <= MAX_BLOCK_SIZE
        ):
            raise ValidationError("block_size", block_size, f"an integer in [1, {MAX_BLOCK_SIZE}]")
        num_blocks = check_num_blocks(num_blocks)
        if not isinstance(enable_prefix_caching, bool):
            raise ValidationError("enable_prefix_caching", enable_prefix_caching, "a bool")
        if hash_fn is not None and not callable(hash_fn):
            raise ValidationError("hash_fn", hash_fn, "None or a callable (parent, token_ids)")
        self.block_size = block_size = int(block_size)
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        fn, self._root_seed, self._verify = resolve_hash_fn(hash_algo)
        if hash_fn is not None:
            fn, self._verify = hash_fn, True
        self._hash_fn: Callable = fn
        # The one record of each request's blocks (its ids are the handle others read).
        self._tables: dict[str, _Table] = {}
        # Bumped whenever a live block id list changes other than by appending (copy-on-write,
        # trim): a cached block table (runner) may keep rows only while this stays the same.
        self.table_edits = 0
        self.stats = PrefixCacheStats()
        self.pending_copies: list[tuple[int, int]] = []

    # ---- queries ---------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take now (free and evictable cached ones)."""
        return self.pool.num_free

    def block_usage(self) -> dict[str, int]:
        """The pool's usable blocks (``num_blocks``, the null block excluded) split into
        ``free`` (no prefix-cache entry), ``cached`` (free but still in the prefix cache,
        evictable) and ``used`` (held by requests): ``free + cached + used == num_blocks``,
        and ``used == 0`` once every request has been freed (the leak check). Counts as
        ``check_integrity`` does; O(cached blocks).

        CUDA graphs: host only."""
        pool = self.pool
        cached = sum(1 for bucket in pool.cached.values() for b in bucket.values() if not b.ref_cnt)
        total = self.num_usable_blocks
        return {
            "num_blocks": total,
            "free": pool.num_free - cached,
            "cached": cached,
            "used": total - pool.num_free,
        }

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: read, never mutate)."""
        table = self._tables.get(check_request_id(request_id))
        return [] if table is None else table

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that ``num_tokens`` token slots take (``num_tokens`` in ``[0, 2**31 - 1]``)."""
        if type(num_tokens) is not int or not 0 <= num_tokens <= MAX_TOKENS:
            num_tokens = check_tokens("num_tokens", num_tokens)
        return -(-num_tokens // self.block_size)

    # ---- hashing ---------------------------------------------------------------------------
    def _ensure_hashes(self, request: Request, num_full_blocks: int) -> list[Hashable]:
        hashes = request.block_hashes
        if len(hashes) < num_full_blocks:
            fn, bs, toks = self._hash_fn, self.block_size, request.all_token_ids
            parent = (
                hashes[-1]
                if hashes
                else root_hash(fn, self._root_seed, request.cache_salt, request.adapter_id)
            )
            for b in range(len(hashes), num_full_blocks):
                parent = fn(parent, toks[b * bs : (b + 1) * bs])
                hashes.append(parent)
        return hashes

    def _root_ref(self, request: Request) -> tuple:
        return ("root", request.cache_salt, request.adapter_id)

    # ---- prefix matching -------------------------------------------------------------------
    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted lookup in ``stats`` (the scheduler calls it once per admission):
        ``num_hit_tokens`` of ``num_tokens`` (ints, ``0 <= hits <= num_tokens <= 2**31 - 1``)."""
        num_tokens = check_tokens("num_tokens", num_tokens)
        if check_tokens("num_hit_tokens", num_hit_tokens) > num_tokens:
            raise ValidationError("num_hit_tokens", num_hit_tokens, f"<= num_tokens={num_tokens}")
        if not self.enable_prefix_caching:
            return
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    def match_prefix(self, request: Request, record_stats: bool = True) -> PrefixMatch:
        """Longest chain of cached blocks equal to the request's leading full blocks.

        Never covers the last known token: at least one token is left to compute, so the step
        produces logits. Takes no references; pass the result to ``allocate_slots``. With
        ``record_stats`` the lookup is counted in ``stats`` (the scheduler counts only the
        lookups of admissions that succeed, through ``record_prefix_lookup``).
        """
        check_request("request", request)
        if not isinstance(record_stats, bool):
            raise ValidationError("record_stats", record_stats, "a bool")
        if not self.enable_prefix_caching:
            return _NO_MATCH
        max_blocks = (request.num_tokens - 1) // self.block_size
        if record_stats:
            self.stats.queries += request.num_tokens
        if max_blocks <= 0:
            return _NO_MATCH
        hashes = self._ensure_hashes(request, max_blocks)
        found = (self._match_verified if self._verify else self._match_by_hash)(
            request, hashes, max_blocks
        )
        n = len(found) * self.block_size
        if record_stats:
            self.stats.hits += n
        return PrefixMatch(found, n)

    def _match_by_hash(self, request: Request, hashes: list, max_blocks: int) -> list[Block]:
        """Collision-free hashes: any block under the hash is the right one."""
        found = []
        lookup = self.pool.lookup
        for i in range(max_blocks):
            bucket = lookup(hashes[i])
            if bucket is None:
                break
            found.append(next(iter(bucket.values())))
        return found

    def _match_verified(self, request: Request, hashes: list, max_blocks: int) -> list[Block]:
        """Hashes may collide: a candidate must hold the request's tokens and hang off a block
        matched one level up (or the request's root). All valid chains are followed level by
        level, so duplicate copies of a prefix never hide a longer match."""
        bs, toks = self.block_size, request.all_token_ids
        frontier: dict[object, Block | None] = {self._root_ref(request): None}
        levels: list[dict[object, Block | None]] = []
        for i in range(max_blocks):
            bucket = self.pool.lookup(hashes[i])
            if bucket is None:
                break
            want = tuple(toks[i * bs : (i + 1) * bs])
            nxt: dict[object, Block | None] = {}
            for cand in bucket.values():
                if cand.token_ids == want and cand.parent_ref in frontier:
                    nxt[(cand.block_id, cand.gen)] = cand
            if not nxt:
                break
            levels.append(nxt)
            frontier = nxt
        found: list[Block] = []
        for level in reversed(levels):  # walk back from any deepest block through its parents
            block = level[found[-1].parent_ref] if found else next(iter(level.values()))
            found.append(block)
        found.reverse()
        return found

    # ---- allocation ------------------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        prefix: PrefixMatch | None = None,
        num_lookahead_tokens: int = 0,
    ) -> BlockTable | None:
        """Make room for ``num_new_tokens`` after the computed ones (and after ``prefix`` hits,
        given on a request's admission), plus ``num_lookahead_tokens`` speculative slots.

        Returns the request's block table (a :class:`BlockTable`: the live list of its block
        ids, with ``capacity``, the token slots now reserved), or None when the pool is short;
        then nothing changed.
        Copy-on-write: writing into a partially filled block shared after ``fork`` first moves
        the writer to a private copy, recorded in ``pending_copies``.
        """
        # hot path (every request, every step): type and range checks; other integers take the
        # slow path
        if (
            type(num_new_tokens) is not int
            or type(num_lookahead_tokens) is not int
            or not 0 <= num_new_tokens <= MAX_TOKENS
            or not 0 <= num_lookahead_tokens <= MAX_TOKENS
        ):
            num_new_tokens, num_lookahead_tokens = check_counts(
                num_new_tokens, num_lookahead_tokens
            )
        if not isinstance(request, Request):
            check_request("request", request)
        if prefix is not None and not isinstance(prefix, PrefixMatch):
            raise ValidationError("prefix", type(prefix).__name__, "None or a PrefixMatch")
        rid = request.request_id
        table = self._tables.get(rid)
        blocks = None if table is None else table.blocks
        bs = self.block_size
        if blocks is not None and prefix is None:  # fast path: a running request's next tokens
            computed = request.num_computed_tokens
            reserve = num_new_tokens + num_lookahead_tokens
            if computed + reserve <= len(blocks) * bs and (
                computed % bs == 0 or reserve == 0 or blocks[computed // bs].ref_cnt == 1
            ):
                if computed % bs == 0 or blocks[computed // bs].ref_cnt == 1:
                    table.capacity = len(blocks) * bs
                return table
        hits = prefix.blocks if prefix is not None else ()
        if hits and blocks:
            raise ValidationError("prefix", f"{len(hits)} blocks", "only on a request's admission")
        num_blocks = len(blocks) if blocks is not None else 0
        computed = request.num_computed_tokens + len(hits) * bs
        total = computed + num_new_tokens + num_lookahead_tokens
        num_new_blocks = -(-total // bs) - num_blocks - len(hits)
        # Copy-on-write when any slot this call reserves (new or lookahead) lies in a partial
        # block shared with a fork.
        cow = (
            computed % bs != 0
            and num_new_tokens + num_lookahead_tokens > 0
            and num_blocks > computed // bs
            and blocks[computed // bs].ref_cnt > 1
        )
        need = max(num_new_blocks, 0) + cow
        if hits:
            need += sum(1 for b in hits if b.ref_cnt == 0)
        pool = self.pool
        if need > pool.num_free:
            return None  # nothing changed, not even a table for a new request
        if table is None:
            table = self._tables[rid] = _Table(request)
            blocks = table.blocks
        if hits:
            pool.touch(hits)
            blocks.extend(hits)
            table.extend(b.block_id for b in hits)
            table.num_committed = len(hits)
        if cow:
            self._copy_on_write(table, computed // bs)
        if num_new_blocks > 0:
            new = pool.allocate(num_new_blocks)
            blocks.extend(new)
            table.extend(b.block_id for b in new)
        table.capacity = len(blocks) * bs
        return table

    def _copy_on_write(self, table: _Table, idx: int) -> None:
        shared = table.blocks[idx]
        (private,) = self.pool.allocate(1)
        self.pool.free((shared,))
        table.blocks[idx] = private
        table[idx] = private.block_id
        self.table_edits += 1
        self.pending_copies.append((shared.block_id, private.block_id))

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block pairs the runner must copy before the next forward."""
        out, self.pending_copies = self.pending_copies, []
        return out

    def end_step(self) -> KVStepChanges:
        """The KV changes of the step just scheduled: the copy-on-write pairs to copy before
        its forward (taken: reported once) and the table-edit counter. Host only."""
        out, self.pending_copies = self.pending_copies, []
        return KVStepChanges(out, self.table_edits)

    def requeue_copies(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copies of a schedule that will not run (async scheduling dropped it): the next
        ``end_step`` reports them first. Host only."""
        self.pending_copies[:0] = pairs

    # ---- commit / free / fork --------------------------------------------------------------
    def commit(self, request: Request) -> None:
        """Publish the request's blocks that are full of computed tokens (KV written)."""
        if not isinstance(request, Request):
            check_request("request", request)
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id)
        if table is None:
            return
        done = table.num_committed
        num_full = min(request.num_computed_tokens // self.block_size, len(table.blocks))
        if num_full <= done:
            return
        hashes = self._ensure_hashes(request, num_full)
        blocks, bs, toks = table.blocks, self.block_size, request.all_token_ids
        parent_ref = (
            self._root_ref(request)
            if done == 0
            else (blocks[done - 1].block_id, blocks[done - 1].gen)
        )
        for i in range(done, num_full):
            block = blocks[i]
            if block.block_hash is None:
                parent_hash = hashes[i - 1] if i else None
                token_ids = tuple(toks[i * bs : (i + 1) * bs])
                self.pool.cache_block(block, hashes[i], parent_hash, token_ids, parent_ref)
            parent_ref = (block.block_id, block.gen)
        table.num_committed = num_full

    def free(self, request: Request) -> None:
        """Release all of the request's blocks, tail first. Idempotent."""
        if not isinstance(request, Request):
            check_request("request", request)
        table = self._tables.pop(request.request_id, None)
        if table is None:
            return
        # the ids stay as they are: a schedule already launched may still read them
        table.capacity = 0
        self.pool.free(reversed(table.blocks))

    def trim(self, request: Request, num_tokens: int) -> None:
        """Keep only the blocks needed for ``num_tokens`` slots (speculative rollback, aborted
        lookahead). Committed (hashed) blocks are never trimmed. ``num_tokens``: an int in
        ``[0, 2**31 - 1]``, else a ValidationError and nothing changes."""
        if not isinstance(request, Request):
            check_request("request", request)
        if type(num_tokens) is not int or not 0 <= num_tokens <= MAX_TOKENS:
            num_tokens = check_tokens("num_tokens", num_tokens)
        table = self._tables.get(request.request_id)
        if table is None:
            return
        blocks = table.blocks
        keep = max(self.blocks_needed(num_tokens), table.num_committed)
        if keep < len(blocks):
            extra = blocks[keep:]
            del blocks[keep:]
            del table[keep:]
            self.table_edits += 1
            table.capacity = min(table.capacity, keep * self.block_size)
            self.pool.free(reversed(extra))

    def fork(self, parent: Request, child: Request, num_tokens: int | None = None) -> None:
        """Give ``child`` the parent's blocks by reference (parallel sampling). The child must
        be fresh; it inherits the parent's first ``num_tokens`` computed tokens (default: all
        of them; an int in ``[0, parent.num_computed_tokens]``), its tokens there must be the
        parent's. A shared partial block is copied on the first write by either side."""
        check_request("parent", parent)
        check_request("child", child)
        if child.request_id in self._tables:
            raise ValidationError("child.request_id", child.request_id, "a request with no blocks")
        have = parent.num_computed_tokens
        if num_tokens is None:
            num_tokens = have
        elif type(num_tokens) is not int or not 0 <= num_tokens <= have:
            raise ValidationError("num_tokens", num_tokens, f"None or an int in [0, {have}]")
        # Only blocks holding computed tokens are shared: the parent's lookahead blocks past
        # them are unwritten and stay its own (sharing them would let both sides write there).
        bs = self.block_size
        keep = self.blocks_needed(num_tokens)
        ptable = self._tables.get(parent.request_id)
        blocks = [] if ptable is None else ptable.blocks[:keep]
        self.pool.touch(blocks)
        table = self._tables[child.request_id] = _Table(child)
        table.blocks.extend(blocks)
        table.extend(b.block_id for b in blocks)
        # blocks full of the child's tokens that the parent has published
        table.num_committed = min(0 if ptable is None else ptable.num_committed, num_tokens // bs)
        # A shared partial block must be copied before either side writes into it: cap both
        # at their computed tokens so their next write takes the allocating (copying) path.
        table.capacity = num_tokens
        if num_tokens % bs and ptable is not None and have < keep * bs:
            ptable.capacity = min(ptable.capacity, have)
        child.num_computed_tokens = num_tokens
        child.block_hashes = list(parent.block_hashes[: num_tokens // bs])

    def owned_blocks(self) -> dict[str, list[Block]]:
        """Request id -> its Block objects (for the integrity check and tests). Host only."""
        return {rid: t.blocks for rid, t in self._tables.items()}

    def tables(self) -> dict[str, _Table]:
        """Request id -> its block table record (for the integrity check). Host only."""
        return self._tables

    def check_integrity(self) -> None:
        """Assert every pool invariant (see ``integrity.check_integrity``)."""
        from layerzero_serve.kv_cache._integrity import check_integrity

        check_integrity(self)
