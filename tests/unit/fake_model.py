"""A deterministic fake model for scheduler tests.

It keeps a "KV cache" of token ids per slot: each step it writes every scheduled token into its
slot (through the block table) and then reads the whole context back through the block table.
A wrong block table, a shared block overwritten by another request, or a prefix hit on the
wrong blocks therefore changes the context it reads, which changes its output, and the
``assert`` below catches it at once. The next token is a hash of the context.
"""

from __future__ import annotations

import numpy as np

from layerzero_serve.types import SchedulerOutput


class FakeModel:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 97) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.kv = np.full(num_blocks * block_size, -1, dtype=np.int64)
        self.num_calls = 0

    def next_token(self, context: list[int]) -> int:
        h = 0
        for t in context[-8:]:
            h = (h * 1_000_003 + t + 1) & 0xFFFF_FFFF
        return (h + len(context)) % self.vocab_size

    def __call__(self, out: SchedulerOutput) -> list[list[int]]:
        self.num_calls += 1
        bs = self.block_size
        for src, dst in out.blocks_to_copy:
            self.kv[dst * bs : (dst + 1) * bs] = self.kv[src * bs : (src + 1) * bs]
        results = []
        for ch in out.chunks:
            toks = ch.request.all_token_ids + out.drafts.get(ch.request.request_id, [])
            for pos in range(ch.start, ch.start + ch.num_tokens):
                self.kv[ch.block_ids[pos // bs] * bs + pos % bs] = toks[pos]
            end = ch.start + ch.num_tokens
            slots = [ch.block_ids[p // bs] * bs + p % bs for p in range(end)]
            context = self.kv[slots].tolist()
            assert context == toks[:end], f"{ch.request.request_id}: KV read back is wrong"
            results.append([self.next_token(context)] if ch.samples else [])
        return results


def reference_output(
    model: FakeModel, prompt: list[int], max_tokens: int, eos: int | None = None
) -> list[int]:
    """What a request must produce, computed without any cache or scheduler."""
    ctx = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = model.next_token(ctx)
        out.append(t)
        ctx.append(t)
        if t == eos:
            break
    return out
