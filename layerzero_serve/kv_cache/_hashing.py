"""Chained block hashes for the prefix cache.

A full block's hash is ``H(parent_hash, token_ids)``; the chain starts from a per-request root
``H(cache_salt, adapter_id)`` so that requests with different salts or adapters never share a
block, and requests with equal ones do.

Two hash functions:

* ``sha256`` (default): 32-byte digests; collisions are treated as impossible.
* ``fast``: Python's 64-bit tuple hash (deterministic for ints, ~10x cheaper). Collisions are
  possible, so the prefix cache verifies the token ids and the parent block on every hit.

Any callable ``(parent, token_ids) -> hashable`` can be supplied (tests use a constant one to force
collisions).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Hashable, Sequence

BlockHashFn = Callable[[Hashable, Sequence[int]], Hashable]

_SHA_ROOT = hashlib.sha256(b"layerzero_serve/prefix-root/v1").digest()
_FAST_ROOT = 0x5EED_1A7E_0000_0001


def sha256_block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """SHA-256 over the parent digest and the token ids as little-endian int64."""
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids))
    return h.digest()


def fast_block_hash(parent: int, token_ids: Sequence[int]) -> int:
    """64-bit non-cryptographic hash; must be paired with token verification on hits."""
    return hash((parent, *token_ids))


_HASH_FNS: dict[str, tuple[BlockHashFn, Hashable]] = {
    "sha256": (sha256_block_hash, _SHA_ROOT),
    "fast": (fast_block_hash, _FAST_ROOT),
}

HASH_ALGORITHMS = tuple(_HASH_FNS)


def resolve_hash_fn(name: str) -> tuple[BlockHashFn, Hashable, bool]:
    """Return ``(hash_fn, root_seed, verify_tokens_on_hit)`` for an algorithm name."""
    from layerzero_serve.errors import ValidationError

    if not isinstance(name, str) or name not in _HASH_FNS:
        raise ValidationError("prefix_hash", name, f"one of {HASH_ALGORITHMS}")
    fn, root = _HASH_FNS[name]
    return fn, root, name != "sha256"


def root_hash(
    hash_fn: BlockHashFn, seed: Hashable, cache_salt: str | None, adapter_id: int | None
) -> Hashable:
    """The parent of a request's first block: mixes the extra keys into the whole chain."""
    if cache_salt is None and adapter_id is None:
        return seed
    salt_ids = list(cache_salt.encode()) if cache_salt is not None else []
    # Lengths and a separator keep (salt, adapter) pairs unambiguous.
    has_adapter = adapter_id is not None
    keys = [len(salt_ids), *salt_ids, -1, int(has_adapter), adapter_id if has_adapter else 0]
    return hash_fn(seed, keys)


def hash_full_blocks(
    hash_fn: BlockHashFn,
    parent: Hashable,
    token_ids: Sequence[int],
    block_size: int,
    start_block: int,
    end_block: int,
) -> list[Hashable]:
    """Hashes of blocks ``start_block .. end_block-1`` of ``token_ids``, chained from ``parent``
    (the hash of block ``start_block - 1`` or the root)."""
    out = []
    for b in range(start_block, end_block):
        parent = hash_fn(parent, token_ids[b * block_size : (b + 1) * block_size])
        out.append(parent)
    return out
