"""The two-stage row argmax of the greedy fast path equals torch.argmax: first maximum on ties,
a NaN's index when a row holds one; its failure flags equal the max-reduction ones."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.sampling._processors import greedy_and_flags, row_argmax, row_max_and_flags


@pytest.mark.parametrize("vocab", [32000, 128256, 151936, 4099])
def test_two_stage_argmax_equals_argmax(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(5, vocab, generator=g)
    x[1, 7] = x[1, vocab - 3] = 50.0  # a tie: the first index wins
    x[2] = 1.0  # all equal
    x[3, vocab // 2] = float("nan")
    x[4] = float("-inf")
    want = x.argmax(dim=-1)
    got = row_argmax(x, two_stage=True)
    assert torch.equal(got, want)
    assert got[1] == 7 and got[2] == 0


def test_greedy_flags_equal_the_max_reduction_flags():
    x = torch.randn(4, 1000)
    x[1, 3] = float("nan")
    x[2, 9] = float("inf")
    x[3] = float("-inf")
    tokens, flags = greedy_and_flags(x)
    assert torch.equal(flags, row_max_and_flags(x)[1])
    assert torch.equal(tokens, x.argmax(dim=-1))
