"""n-gram (prompt lookup) proposer: exact cases, the stateless scan and the incremental index
against a brute-force oracle, incremental state across steps, and validation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.spec_decode import NgramIndex, NgramProposer, Proposer, find_ngram_match


def oracle(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Literal reading of the rule: longest n first, latest earlier start first."""
    length = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        suffix = tokens[length - n :] if n <= length else None
        for start in range(length - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def _all_ways(tokens, k, min_n, max_n):
    """The proposal through the scan (list and array input) and through the index."""
    prop = NgramProposer(k=k, min_n=min_n, max_n=max_n)
    index = NgramIndex(min_n, max_n)
    index.extend(tokens)
    return [
        prop.propose([tokens])[0],
        prop.propose([np.asarray(tokens, dtype=np.int32)])[0],
        prop.propose([tokens], request_ids=["r"])[0],
        index.propose(k),
    ]


@pytest.mark.parametrize(
    "tokens,k,min_n,max_n,expect",
    [
        ([1, 2, 3, 4, 1, 2], 2, 1, 3, [3, 4]),  # "1 2" seen before: what followed
        ([1, 2, 3, 4, 1, 2], 5, 1, 3, [3, 4, 1, 2]),  # k truncated at the end of the sequence
        ([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 3, 1, 3, [9, 2, 3]),  # the 3-gram beats a later 2-gram
        ([5, 2, 3, 8, 2, 3, 7, 2, 3], 2, 1, 3, [7, 2]),  # most recent occurrence of "2 3"
        ([1, 2, 3, 4, 5], 3, 1, 3, []),  # no repeat at all
        ([1, 2, 3, 4, 1, 2], 2, 3, 4, []),  # only a 2-gram repeats: below min_n
        ([7, 7, 7, 7], 3, 2, 2, [7]),  # overlapping occurrence: one token before the end
        ([7, 7, 7, 7], 3, 1, 1, [7]),
        ([7, 7, 7, 7, 7, 7], 3, 2, 3, [7]),
        ([4, 9, 4], 4, 1, 4, [9, 4]),
        ([4], 2, 1, 2, []),
        ([], 2, 1, 2, []),
        ([1, 2, 1, 2], 0, 1, 2, []),  # k = 0
    ],
)
def test_exact_cases(tokens, k, min_n, max_n, expect):
    assert oracle(tokens, min_n, max_n, k) == expect
    assert _all_ways(tokens, k, min_n, max_n) == [expect] * 4


def test_find_ngram_match_reports_length_and_end():
    assert find_ngram_match(np.array([1, 2, 3, 9, 1, 2, 3]), 1, 5) == (3, 3)
    assert find_ngram_match(np.array([1, 2, 3]), 1, 5) == (0, -1)


def test_random_sequences_match_the_oracle():
    rng = random.Random(0)
    for _ in range(1500):
        vocab = rng.choice([2, 3, 6, 40])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(0, 50))]
        min_n = rng.randint(1, 4)
        max_n = rng.randint(min_n, 6)
        k = rng.randint(0, 6)
        expect = oracle(tokens, min_n, max_n, k)
        assert _all_ways(tokens, k, min_n, max_n) == [expect] * 4, (tokens, min_n, max_n, k)


def test_incremental_state_follows_appends_and_rebuilds_on_rewrites():
    rng = random.Random(1)
    prop = NgramProposer(k=3, min_n=1, max_n=3)
    history = {"a": [], "b": []}
    for step in range(300):
        for rid, toks in history.items():
            toks.extend(rng.randrange(4) for _ in range(rng.randint(0, 3)))
            if rid == "b" and step % 50 == 49:
                del toks[-5:]  # e.g. preemption: the history is shorter than before
            if rid == "b" and step % 70 == 69 and toks:
                toks[-1] = (toks[-1] + 1) % 4  # the last token changed: rebuild
        got = prop.propose(list(history.values()), request_ids=list(history))
        assert got == [oracle(t, 1, 3, 3) for t in history.values()]
    prop.release("a")
    prop.release("unknown")  # no-op
    assert list(prop._indexes) == ["b"]


def test_long_and_short_appends_agree_with_the_oracle():
    """Appends of 16+ tokens take the vectorised (numpy) path, shorter ones the per-token path:
    after every append of every size the proposal is the oracle's."""
    rng = random.Random(2)
    for _ in range(60):
        vocab = rng.choice([2, 3, 7, 128000])
        min_n = rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        index, tokens = NgramIndex(min_n, max_n), []
        while len(tokens) < 300:
            new = [rng.randrange(vocab) for _ in range(rng.choice([1, 2, 15, 16, 17, 40, 90]))]
            index.extend(new)
            tokens += new
            assert index.propose(4) == oracle(tokens, min_n, max_n, 4), (tokens, min_n, max_n)


def test_batch_and_default_k():
    prop = NgramProposer(k=2, min_n=1, max_n=2)
    assert prop.propose([[1, 2, 1], [3, 4], [5, 5, 5, 5]]) == [[2, 1], [], [5]]
    assert prop.propose([[1, 2, 3, 1]], k=1) == [[2]]
    assert isinstance(prop, Proposer) and prop.name == "ngram" and prop.needs_model is False


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(k=-1), "k"),
        (dict(k=65), "k"),
        (dict(k=2.0), "k"),
        (dict(min_n=0), "min_n"),
        (dict(min_n=3, max_n=2), "max_n"),
        (dict(max_n=True), "max_n"),
    ],
)
def test_validation(kwargs, param):
    with pytest.raises(ValidationError) as e:
        NgramProposer(**kwargs)
    assert e.value.param == param


def test_propose_validation():
    prop = NgramProposer()
    with pytest.raises(ValidationError, match="k=-2"):
        prop.propose([[1, 2]], k=-2)
    with pytest.raises(ValidationError, match="request_ids"):
        prop.propose([[1, 2], [3]], request_ids=["a"])
    with pytest.raises(ValidationError, match="max_n"):
        NgramIndex(3, 1)
