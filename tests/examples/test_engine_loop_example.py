"""examples/engine_loop.py: the scheduler and KV manager driving a user's own paged model give
every finished request exactly the direct computation, through a preemption, prefix hits and an
abort, and every block comes back."""

from __future__ import annotations

from example_loader import load_example


def test_engine_loop_matches_the_direct_computation():
    res = load_example("engine_loop").main()
    assert res["matches_reference"]
    assert res["finished"]["r5"] == "abort"
    done = [r for r, why in res["finished"].items() if why == "length"]
    assert sorted(done) == ["r0", "r1", "r2", "r3", "r4"]
    assert all(len(res["outputs"][r]) == 12 for r in done)
    assert res["preemptions"] >= 1  # the pool is too small for all of them at once
    assert res["prefix_hit_tokens"] >= 16  # the shared system prompt was reused
    assert res["free_blocks_at_end"] == res["usable_blocks"]  # nothing leaked
