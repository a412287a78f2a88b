"""examples/custom_kernel.py: the selection equals what the registration and constraints say,
and generation through the user's kernel equals generation through the built-in one."""

from __future__ import annotations

from example_loader import load_example


def test_custom_kernel_is_chosen_where_it_fits_and_explains_where_it_loses():
    res = load_example("custom_kernel").main()
    assert res["chosen_where_it_fits"] == "mine.decode"
    assert res["chosen_elsewhere"] == "torch.paged_decode"
    assert res["why_it_lost"] == "head_dim"
    assert res["engine_decode"] == "mine.decode"
    assert res["calls"] > 0
    assert res["tokens"] == res["reference_tokens"]
    assert all(len(t) == 8 for t in res["tokens"])
