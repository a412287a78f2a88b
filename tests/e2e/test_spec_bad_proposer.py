"""A user-written proposer that misbehaves for one request (garbage rows, a wrong row count,
an exception) costs that step's drafts, never the engine: every request still finishes, and
greedy output equals plain decoding's. The draft cleaner's own contract is checked directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerzero_serve.engine import Engine
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.spec_decode import Proposer
from layerzero_serve.spec_decode._coordinator import clean_drafts

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 8, 7, 6], [11, 12, 11, 12, 11], [3, 4, 5]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _run(proposer=None) -> tuple[dict[str, list[int]], Engine]:
    kw = {} if proposer is None else {"speculative_method": proposer}
    eng = Engine(model="dummy:tiny", device="cpu", seed=0, adaptive_speculation=False, **kw)
    ids = [eng.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
    got = {i: [] for i in ids}
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
        steps += 1
        assert steps < 200
    return got, eng


@pytest.fixture(scope="module")
def plain():
    return _run()[0]


GARBAGE = {
    "nan": [math.nan],
    "inf": [math.inf, 3],
    "array": np.array([3, 4]).reshape(1, 2),
    "tensor": torch.tensor([[3, 4]]),
    "string": "abc",
    "dict": {3: 4},
    "int": 7,
    "nested": [[3, 4]],
    "float": [3.5],
}


class OneBadRow(Proposer):
    """Good drafts (the last token repeated) for every request but r1, which gets ``bad``."""

    name = "one-bad-row"

    def __init__(self, bad) -> None:
        self.bad = bad

    def propose(self, requests_tokens, k, request_ids=None):
        return [
            self.bad if rid == "r1" else [toks[-1]] * k
            for toks, rid in zip(requests_tokens, request_ids, strict=True)
        ]


@pytest.mark.parametrize("bad", list(GARBAGE), ids=list(GARBAGE))
def test_garbage_for_one_request_leaves_every_output_exact(plain, bad):
    got, eng = _run(OneBadRow(GARBAGE[bad]))
    assert got == plain
    assert eng.spec.stats()["drafts"] > 0  # the other requests did speculate


class WholeBatchFailure(Proposer):
    name = "broken"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def propose(self, requests_tokens, k, request_ids=None):
        if self.mode == "raise":
            raise RuntimeError("proposer bug")
        if self.mode == "short":
            return [[t[-1]] for t in requests_tokens][:-1]
        return None


@pytest.mark.parametrize("mode", ["raise", "short", "none"])
def test_a_failing_proposer_means_no_drafts_not_an_engine_error(plain, mode, caplog):
    got, eng = _run(WholeBatchFailure(mode))
    assert got == plain
    stats = eng.spec.stats()
    assert stats["drafts"] == 0 and stats["proposer_errors"] > 0
    assert "failed" in caplog.text


def test_clean_drafts_keeps_the_valid_prefix_of_ints():
    v = 100
    assert clean_drafts([1, 2, 3], 2, v) == [1, 2]
    assert clean_drafts((1, np.int64(2), torch.tensor(3)), 5, v) == [1, 2, 3]
    assert clean_drafts([1, 100, 2], 5, v) == [1]  # cut at the first id outside the vocabulary
    assert clean_drafts([1, -1, 2], 5, v) == [1]
    assert clean_drafts([1, 2.0, 3], 5, v) == [1]  # floats are not ids
    assert clean_drafts([True, 1], 5, v) == []
    assert clean_drafts(iter([4, 5]), 5, v) == [4, 5]
    for row in (None, "12", b"1", {1: 2}, {1}, 3, [[1]], np.array([[1, 2]])):
        assert clean_drafts(row, 5, v) == []
    assert clean_drafts([1, 2], 0, v) == []


@pytest.mark.parametrize(
    "args,param",
    [((-1, 2, 8), "num_rows"), ((2, math.nan, 8), "k"), ((True, 1, 8), "num_rows"),
     ((2, 2, 0), "vocab_size"), ((10**6, 4, 10**6), r"num_rows \* vocab_size")],
)  # fmt: skip
def test_draw_randoms_validates_its_sizes(args, param):
    from layerzero_serve.errors import ValidationError
    from layerzero_serve.spec_decode import draw_randoms

    with pytest.raises(ValidationError, match=param):
        draw_randoms(*args)
