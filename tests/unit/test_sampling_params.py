"""SamplingParams validation: every bad value names its field; every edge value is accepted."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import SamplingParams

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

BAD = [
    # n: int in 1..256
    ("n", 0),
    ("n", -1),
    ("n", 257),
    ("n", True),
    ("n", 1.0),
    ("n", "1"),
    ("n", None),
    # temperature: finite float >= 0
    ("temperature", -1e-6),
    ("temperature", -1.0),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -math.inf),
    ("temperature", True),
    ("temperature", "1.0"),
    ("temperature", None),
    # top_p: (0, 1]
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.0000001),
    ("top_p", 2),
    ("top_p", math.nan),
    ("top_p", math.inf),
    ("top_p", False),
    ("top_p", None),
    # top_k: -1, 0 or >= 1
    ("top_k", -2),
    ("top_k", -100),
    ("top_k", 1.0),
    ("top_k", 5.5),
    ("top_k", True),
    ("top_k", None),
    # min_p: [0, 1]
    ("min_p", -1e-9),
    ("min_p", 1.5),
    ("min_p", math.nan),
    ("min_p", math.inf),
    ("min_p", True),
    ("min_p", "0"),
    # seed: None or int64
    ("seed", INT64_MAX + 1),
    ("seed", INT64_MIN - 1),
    ("seed", 2**64),
    ("seed", 1.0),
    ("seed", True),
    ("seed", False),
    ("seed", "42"),
    # max_tokens: >= 1
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 1.0),
    ("max_tokens", True),
    ("max_tokens", None),
    # stop_token_ids: iterable of non-negative ints
    ("stop_token_ids", (-1,)),
    ("stop_token_ids", (1, 2, -3)),
    ("stop_token_ids", (True,)),
    ("stop_token_ids", (1.0,)),
    ("stop_token_ids", ("a",)),
    ("stop_token_ids", "123"),
    ("stop_token_ids", b"12"),
    ("stop_token_ids", 5),
    ("stop_token_ids", None),
    # ignore_eos: bool
    ("ignore_eos", 1),
    ("ignore_eos", 0),
    ("ignore_eos", "yes"),
    ("ignore_eos", None),
    # repetition_penalty: finite > 0
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", True),
    ("repetition_penalty", None),
    # presence / frequency penalties: [-2, 2]
    ("presence_penalty", 2.0001),
    ("presence_penalty", -3),
    ("presence_penalty", math.nan),
    ("presence_penalty", "0"),
    ("frequency_penalty", -2.5),
    ("frequency_penalty", math.inf),
    ("frequency_penalty", None),
    # logit_bias: dict id >= 0 -> float in [-100, 100]
    ("logit_bias", {1: 101.0}),
    ("logit_bias", {1: math.nan}),
    ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"1": 1.0}),
    ("logit_bias", {True: 1.0}),
    ("logit_bias", {1: "big"}),
    ("logit_bias", 5),
    ("logit_bias", [1, 2]),
    # min_tokens: [0, max_tokens]
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("min_tokens", 1.0),
    ("min_tokens", None),
    # allowed / bad token ids
    ("allowed_token_ids", ()),
    ("allowed_token_ids", (-1,)),
    ("allowed_token_ids", "12"),
    ("bad_token_ids", (1.5,)),
    ("bad_token_ids", None),
    # logprobs / prompt_logprobs: None or [0, 20]; mode raw | processed
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", True),
    ("logprobs", 2.0),
    ("prompt_logprobs", 21),
    ("prompt_logprobs", -1),
    ("logprobs_mode", "logits"),
    ("logprobs_mode", None),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_bad_value_raises_validation_error_naming_field(field, value):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**{field: value})
    err = info.value
    assert isinstance(err, ValueError)
    assert err.param == field
    assert err.allowed  # a human-readable allowed range
    assert field in str(err) and "allowed" in str(err)


GOOD = [
    ("n", 1),
    ("n", 256),
    ("n", np.int64(3)),
    ("temperature", 0.0),
    ("temperature", 0),
    ("temperature", 1e-6),
    ("temperature", 1e6),
    ("temperature", np.float32(0.5)),
    ("top_p", 1.0),
    ("top_p", 1),
    ("top_p", 1e-6),
    ("top_p", 0.5),
    ("top_k", -1),
    ("top_k", 0),
    ("top_k", 1),
    ("top_k", 10**9),
    ("min_p", 0.0),
    ("min_p", 1.0),
    ("min_p", 0),
    ("min_p", 1),
    ("seed", None),
    ("seed", 0),
    ("seed", INT64_MAX),
    ("seed", INT64_MIN),
    ("seed", -1),
    ("max_tokens", 1),
    ("max_tokens", 10**6),
    ("stop_token_ids", ()),
    ("stop_token_ids", [0, 5, 7]),
    ("stop_token_ids", (np.int32(4),)),
    ("ignore_eos", True),
    ("ignore_eos", False),
]


@pytest.mark.parametrize(("field", "value"), GOOD, ids=[f"{f}={v!r}" for f, v in GOOD])
def test_edge_values_accepted(field, value):
    p = SamplingParams(**{field: value})
    stored = getattr(p, field)
    if field == "stop_token_ids":
        assert stored == tuple(int(v) for v in value)
        assert type(stored) is tuple and all(type(v) is int for v in stored)
    elif value is None:
        assert stored is None
    else:
        assert stored == value
        # normalised to plain Python scalars of the documented type
        expected_type = {"temperature": float, "top_p": float, "min_p": float}.get(field, int)
        if field == "ignore_eos":
            expected_type = bool
        assert type(stored) is expected_type


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.stop_token_ids, p.ignore_eos) == (None, 16, (), False)
    assert not p.is_greedy


def test_frozen_slots_hashable():
    p = SamplingParams(top_k=5, stop_token_ids=[3, 4])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.top_k = 6  # type: ignore[misc]
    assert not hasattr(p, "__dict__")
    assert p == SamplingParams(top_k=5, stop_token_ids=(3, 4))
    assert hash(p) == hash(SamplingParams(top_k=5, stop_token_ids=(3, 4)))


def test_stop_token_ids_from_generator_stored_as_tuple():
    p = SamplingParams(stop_token_ids=(i for i in (9, 8)))
    assert p.stop_token_ids == (9, 8)


@pytest.mark.parametrize(
    ("kw", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"top_k": 1}, True),
        ({"temperature": 0.0, "top_k": 5}, True),
        ({"temperature": 1e-6}, False),
        ({"top_k": 2}, False),
        ({"top_k": -1}, False),
        ({"top_p": 1e-6}, False),  # effectively argmax, but still a sampled row
    ],
)
def test_is_greedy(kw, greedy):
    assert SamplingParams(**kw).is_greedy is greedy


def test_validate_for_vocab():
    SamplingParams(stop_token_ids=(0, 31)).validate_for_vocab(32)
    SamplingParams().validate_for_vocab(1)
    for ids in [(32,), (0, 5, 100)]:
        with pytest.raises(ValidationError) as info:
            SamplingParams(stop_token_ids=ids).validate_for_vocab(32)
        assert info.value.param == "stop_token_ids"
        assert isinstance(info.value, ValueError)
        assert "[0, 32)" in info.value.allowed
    for vocab in [0, -1, True, 3.0]:
        with pytest.raises(ValidationError) as info:
            SamplingParams().validate_for_vocab(vocab)
        assert info.value.param == "vocab_size"


NEW_GOOD = [
    ("repetition_penalty", 1e-6, 1e-6),
    ("repetition_penalty", 5, 5.0),
    ("presence_penalty", -2, -2.0),
    ("frequency_penalty", 2.0, 2.0),
    ("logit_bias", {5: 1, 2: -100.0}, ((2, -100.0), (5, 1.0))),
    ("logit_bias", None, ()),
    ("logit_bias", [(3, 0.5)], ((3, 0.5),)),
    ("min_tokens", 16, 16),
    ("min_tokens", np.int64(0), 0),
    ("allowed_token_ids", [4, 2], (4, 2)),
    ("allowed_token_ids", None, None),
    ("bad_token_ids", (np.int32(7),), (7,)),
    ("logprobs", 0, 0),
    ("logprobs", 20, 20),
    ("prompt_logprobs", None, None),
    ("prompt_logprobs", 5, 5),
    ("logprobs_mode", "processed", "processed"),
]


@pytest.mark.parametrize(
    ("field", "value", "stored"), NEW_GOOD, ids=[f"{f}={v!r}" for f, v, _ in NEW_GOOD]
)
def test_new_fields_accepted_and_normalised(field, value, stored):
    p = SamplingParams(**{field: value})
    assert getattr(p, field) == stored
    assert type(getattr(p, field)) is type(stored)
    hash(p)  # stays hashable (dicts and lists are stored as tuples)


def test_new_defaults_and_derived_flags():
    p = SamplingParams()
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.logit_bias, p.min_tokens, p.allowed_token_ids, p.bad_token_ids) == ((), 0, None, ())
    assert (p.logprobs, p.prompt_logprobs, p.logprobs_mode) == (None, None, "raw")
    assert not p.has_penalties and not p.has_token_mask
    assert SamplingParams(frequency_penalty=0.1).has_penalties
    assert SamplingParams(bad_token_ids=[1]).has_token_mask


def test_min_tokens_bound_names_max_tokens():
    with pytest.raises(ValidationError) as info:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert info.value.param == "min_tokens" and "max_tokens=4" in info.value.allowed
    SamplingParams(max_tokens=4, min_tokens=4)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"logit_bias": {32: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [0, 32]}, "allowed_token_ids"),
        ({"bad_token_ids": [31, 40]}, "bad_token_ids"),
        ({"allowed_token_ids": [3, 4], "bad_token_ids": [4, 3]}, "bad_token_ids"),
    ],
)
def test_validate_for_vocab_new_fields(kw, param):
    with pytest.raises(ValidationError) as info:
        SamplingParams(**kw).validate_for_vocab(32)
    assert info.value.param == param and info.value.allowed


def test_validate_for_vocab_all_bad_ids():
    with pytest.raises(ValidationError) as info:
        SamplingParams(bad_token_ids=range(4)).validate_for_vocab(4)
    assert info.value.param == "bad_token_ids"
    SamplingParams(bad_token_ids=range(3), logit_bias={3: 1.0}).validate_for_vocab(4)
