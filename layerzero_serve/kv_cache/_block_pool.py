"""Physical KV blocks: ref counts, an O(1) intrusive free list, and the hash -> block map.

Block 0 is the reserved null block: never handed out, never freed, never hashed; padding rows of
a batch point their slot mapping at it. The free list holds every block with ``ref_cnt == 0``:

* blocks without a hash sit at the front and are reused first;
* blocks with a hash (still in the prefix cache, evictable) sit behind them in LRU order: a freed
  request hands its blocks back tail first, so its tail is evicted before its head.

A freed block keeps its hash (lazy eviction); the hash is dropped only when the block is
reallocated. All operations are O(1) per block and never allocate Python objects on the hot path.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Iterable, Iterator

NULL_BLOCK_ID = 0
# Largest pool: the pool builds one Python object per block (~150 bytes, ~0.5 us each), so
# 2**24 blocks already take seconds and gigabytes of host memory at start-up.
MAX_NUM_BLOCKS = 1 << 24


def check_num_blocks(num_blocks: object, param: str = "num_blocks") -> int:
    """``num_blocks`` as an int in ``[2, MAX_NUM_BLOCKS]`` (one block is the null block)."""
    if (
        isinstance(num_blocks, bool)
        or not isinstance(num_blocks, numbers.Integral)
        or not 2 <= num_blocks <= MAX_NUM_BLOCKS
    ):
        from layerzero_serve.errors import ValidationError

        raise ValidationError(
            param,
            num_blocks,
            f"an integer in [2, {MAX_NUM_BLOCKS}] (block 0 is the reserved null block)",
        )
    return int(num_blocks)


class Block:
    """One physical block. ``prev_free``/``next_free`` link it into the free list while free."""

    __slots__ = (
        "block_id",
        "ref_cnt",
        "block_hash",
        "parent_hash",
        "token_ids",
        "parent_ref",
        "gen",
        "prev_free",
        "next_free",
    )

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: Hashable | None = None
        self.parent_hash: Hashable | None = None
        self.token_ids: tuple[int, ...] | None = None
        # Identity of the chain this block was hashed under (verified on hits with a fast hash):
        # (parent block id, parent generation) or ("root", salt, adapter) for a first block.
        self.parent_ref: tuple | None = None
        self.gen = 0  # bumped on every (re)allocation, so a stale parent_ref never matches
        self.prev_free: Block | None = None
        self.next_free: Block | None = None

    def __repr__(self) -> str:
        h = None if self.block_hash is None else "hashed"
        return f"Block(id={self.block_id}, ref={self.ref_cnt}, {h})"


class BlockPool:
    """Fixed set of ``num_blocks`` blocks (including the null block)."""

    def __init__(self, num_blocks: int) -> None:
        num_blocks = check_num_blocks(num_blocks)
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.null_block.ref_cnt = 1  # permanently owned by the pool
        # Sentinels make every link/unlink branch-free.
        self._head = Block(-1)
        self._tail = Block(-2)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0  # free + cached-evictable
        for block in self.blocks[1:]:
            self._push_back(block)
        self.cached: dict[Hashable, dict[int, Block]] = {}
        self.num_evictions = 0

    # ---- free list primitives -------------------------------------------------------------
    def _push_back(self, block: Block) -> None:
        last = self._tail.prev_free
        block.prev_free = last
        block.next_free = self._tail
        last.next_free = block
        self._tail.prev_free = block
        self.num_free += 1

    def _push_front(self, block: Block) -> None:
        first = self._head.next_free
        block.prev_free = self._head
        block.next_free = first
        first.prev_free = block
        self._head.next_free = block
        self.num_free += 1

    def _unlink(self, block: Block) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def iter_free(self) -> Iterator[Block]:
        """Walk the free list front to back (allocation order)."""
        node = self._head.next_free
        while node is not self._tail:
            yield node
            node = node.next_free

    # ---- allocation -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block]:
        """Take ``n`` blocks from the front of the free list (caller checked ``num_free``).
        A block that still carries a hash is evicted from the prefix cache here."""
        out = []
        head = self._head
        for _ in range(n):
            block = head.next_free
            nxt = block.next_free
            head.next_free = nxt
            nxt.prev_free = head
            block.prev_free = block.next_free = None
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            block.gen += 1
            out.append(block)
        self.num_free -= n
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on prefix-cache hits, pulling free ones out of the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                self._unlink(block)
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference on each block, in the given order (pass a request's blocks tail
        first so its tail is evicted before its head)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self._push_front(block)
                else:
                    self._push_back(block)

    # ---- prefix cache map -----------------------------------------------------------------
    def cache_block(
        self,
        block: Block,
        block_hash: Hashable,
        parent_hash: Hashable,
        token_ids: tuple[int, ...],
        parent_ref: tuple,
    ) -> None:
        """Publish a full, written block under ``block_hash``."""
        block.block_hash = block_hash
        block.parent_hash = parent_hash
        block.token_ids = token_ids
        block.parent_ref = parent_ref
        bucket = self.cached.get(block_hash)
        if bucket is None:
            self.cached[block_hash] = {block.block_id: block}
        else:
            bucket[block.block_id] = block

    def lookup(self, block_hash: Hashable) -> dict[int, Block] | None:
        return self.cached.get(block_hash)

    def _evict(self, block: Block) -> None:
        bucket = self.cached[block.block_hash]
        del bucket[block.block_id]
        if not bucket:
            del self.cached[block.block_hash]
        block.block_hash = block.parent_hash = block.token_ids = block.parent_ref = None
        self.num_evictions += 1

    def reset_prefix_cache(self) -> int:
        """Forget every evictable cached block (e.g. after weights change). Returns how many."""
        n = 0
        for block in list(self.iter_free()):
            if block.block_hash is not None:
                self._evict(block)
                self._unlink(block)
                self._push_front(block)
                n += 1
        return n
