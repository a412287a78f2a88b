"""Speculative decoding metrics: exact aggregate, per-position and per-request counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.spec_decode._metrics import RequestSpecStats, SpecDecodeMetrics


def test_counts_per_position_and_aggregate():
    m = SpecDecodeMetrics(k_max=4)
    m.update([4, 2, 0, 3], [4, 1, 0, 0], request_ids=["a", "b", "c", "a"])
    m.update(np.array([1, 4]), torch.tensor([1, 2], dtype=torch.int32), request_ids=["b", "c"])
    assert m.total == RequestSpecStats(num_drafts=5, num_draft_tokens=14, num_accepted_tokens=8)
    # position j counts rows with more than j drafts / accepted drafts
    assert m.drafted_per_position.tolist() == [5, 4, 3, 2]
    assert m.accepted_per_position.tolist() == [4, 2, 1, 1]
    assert m.acceptance_rate_per_position() == pytest.approx([4 / 5, 2 / 4, 1 / 3, 1 / 2])
    assert m.acceptance_rate == pytest.approx(8 / 14)
    assert m.mean_accepted_length == pytest.approx(8 / 5)
    assert m.request("a") == RequestSpecStats(2, 7, 4)
    assert m.request("b") == RequestSpecStats(2, 3, 2)
    assert m.request("c") == RequestSpecStats(1, 4, 2)  # its 0-draft row is not a draft
    assert m.request("a").acceptance_rate == pytest.approx(4 / 7)
    assert m.request("a").mean_accepted_length == pytest.approx(2.0)
    assert m.pop_request("a") == RequestSpecStats(2, 7, 4)
    assert m.request("a") is None and m.pop_request("a") is None


def test_empty_and_no_draft_updates():
    m = SpecDecodeMetrics(k_max=3)
    m.update([], [])
    m.update([0, 0], [0, 0])
    assert m.total == RequestSpecStats()
    assert m.acceptance_rate == 0.0 and m.mean_accepted_length == 0.0
    assert np.isnan(m.acceptance_rate_per_position()).all()


@pytest.mark.parametrize(
    "drafts,accepted,ids,param",
    [
        ([5], [0], None, "num_drafts"),
        ([-1], [0], None, "num_drafts"),
        ([2], [3], None, "num_accepted"),
        ([2, 1], [1], None, "num_accepted"),
        ([2], [1], ["a", "b"], "request_ids"),
    ],
)
def test_validation(drafts, accepted, ids, param):
    m = SpecDecodeMetrics(k_max=4)
    with pytest.raises(ValidationError) as e:
        m.update(drafts, accepted, request_ids=ids)
    assert e.value.param == param
    with pytest.raises(ValidationError):
        SpecDecodeMetrics(k_max=0)
