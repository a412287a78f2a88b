"""SamplingParams' text fields: ``stop`` normalised to a tuple and bounded (count, length,
type), the text flags are bools, and stop strings need ``detokenize``."""

from __future__ import annotations

import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.sampling._params import MAX_STOP_STRING_LEN, MAX_STOP_STRINGS


def test_stop_is_normalised():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop=("a",)).max_stop_len == 1 and SamplingParams().max_stop_len == 0
    long = "x" * MAX_STOP_STRING_LEN
    assert SamplingParams(stop=[long] * MAX_STOP_STRINGS).max_stop_len == MAX_STOP_STRING_LEN
    p = SamplingParams(include_stop_str_in_output=True, skip_special_tokens=False)
    assert p.include_stop_str_in_output and not p.skip_special_tokens and p.detokenize


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"stop": ""}, "stop[0]"),
        ({"stop": ["a", ""]}, "stop[1]"),
        ({"stop": ["a", 3]}, "stop[1]"),
        ({"stop": [b"a"]}, "stop[0]"),
        ({"stop": b"a"}, "stop"),
        ({"stop": 7}, "stop"),
        ({"stop": {"a": 1}}, "stop"),
        ({"stop": ["x" * (MAX_STOP_STRING_LEN + 1)]}, "stop[0]"),
        ({"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, "stop"),
        ({"stop": ["a"], "detokenize": False}, "stop"),
        ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
        ({"detokenize": "yes"}, "detokenize"),
    ],
)
def test_bad_text_fields_name_the_field_and_range(kwargs, param):
    with pytest.raises(ValidationError) as ei:
        SamplingParams(**kwargs)
    assert ei.value.param == param
    assert isinstance(ei.value, ValueError) and ei.value.allowed
