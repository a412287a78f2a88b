"""A hand-written engine loop over the runtime's parts: the paged KV cache manager and the
scheduler drive YOUR model function. Shows block allocation, prefix-cache hits, preemption
(a deliberately small pool) and abort.

The "model" is a toy of the user's own: each token's state is written into a paged store
through the slot mapping the scheduler's block tables give, and the next token is computed
from the states read back through the block table. Wrong block ids, a bad prefix hit or a lost
block after preemption would change the output, so ``main()`` checks every finished request
against a direct computation on its token list. CPU only, under a second.
"""

from __future__ import annotations

import numpy as np

from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.types import Request

VOCAB, BLOCK = 1000, 4


def next_token(states: np.ndarray) -> int:
    """The toy model's rule on the states of a whole sequence (its own "attention")."""
    w = np.arange(1, len(states) + 1)
    return int((states * w).sum() % VOCAB)


def token_state(token: int, position: int) -> int:
    return (token * 7 + position * 13) % 9973


class ToyModel:
    """Your model: reads the scheduler's output, writes per-token state into a paged store
    ``[num_blocks, block_size]`` and reads it back through the block tables."""

    def __init__(self, num_blocks: int) -> None:
        self.store = np.full((num_blocks, BLOCK), -1, dtype=np.int64)

    def __call__(self, out) -> list[list[int]]:
        results = []
        for req, start, n, blocks in zip(
            out.requests, out.starts, out.num_scheduled, out.block_ids, strict=True
        ):
            for pos in range(start, start + n):  # write this step's tokens' state
                self.store[blocks[pos // BLOCK], pos % BLOCK] = token_state(
                    req.all_token_ids[pos], pos
                )
            end = start + n
            if end < len(req.all_token_ids):
                results.append([])  # a prefill chunk short of the prompt's end: no token
                continue
            table = np.asarray(blocks)
            pos = np.arange(end)
            states = self.store[table[pos // BLOCK], pos % BLOCK]  # the paged read
            results.append([next_token(states)])
        return results


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    """The same model computed directly on the token list (no cache, no scheduler)."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(next_token(np.array([token_state(t, p) for p, t in enumerate(ids)])))
    return ids[len(prompt) :]


def main() -> dict:
    num_blocks = 16  # small on purpose: the requests below do not all fit at once
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    sched = Scheduler(config, kv)
    model = ToyModel(num_blocks)

    system = list(range(100, 116))  # a shared 16-token prefix: 4 full blocks to reuse
    prompts = {f"r{i}": system + [200 + i, 300 + i, 400 + i] for i in range(6)}
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, prompt, max_tokens=12))
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    finished: dict[str, str] = {}
    preemptions = steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        preemptions += len(out.preempted_ids)
        if steps == 3:
            sched.abort("r5")  # a client went away: its blocks go back to the pool
        for o in sched.update(out, model(out) if out.requests else []):
            got[o.request_id].extend(o.new_token_ids)
            if o.finished:
                finished[o.request_id] = o.finish_reason
        steps += 1

    done = [rid for rid, why in finished.items() if why == "length"]
    ok = all(got[rid] == reference(prompts[rid], 12) for rid in done)
    print(
        f"{steps} steps, {preemptions} preemptions, prefix-cache hit rate {kv.stats.hit_rate:.0%}"
    )
    print(f"finished: {finished}")
    print("every finished request equals the direct computation:", ok)
    kv.check_integrity()
    return {
        "outputs": got,
        "finished": finished,
        "matches_reference": ok,
        "preemptions": preemptions,
        "prefix_hit_tokens": kv.stats.hits,
        "free_blocks_at_end": kv.pool.num_free,
        "usable_blocks": kv.num_usable_blocks,
        "num_blocks": num_blocks,
    }


if __name__ == "__main__":
    main()
