"""Input validation of SamplingParams and the standalone Sampler (fuzzing findings): values that
used to turn into NaN / inf in float32, raise OverflowError / TypeError / IndexError, or fail
only at run time now raise ``ValidationError`` naming the parameter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.sampling._params import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    MIN_TOP_P,
)

V = 50
EOS = 7


def _logits(rows: int = 1, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0))


# ---- 1-3: values that float32 turns into 0 / inf ------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 1e-320),
        ("temperature", 1e-7),
        ("temperature", 5e-324),
        ("temperature", 1e39),
        ("temperature", MAX_TEMPERATURE * 1.0001),
        ("top_p", 1e-320),
        ("top_p", 1e-7),
        ("repetition_penalty", 1e-320),
        ("repetition_penalty", 1e-7),
        ("repetition_penalty", 1e39),
        ("repetition_penalty", MAX_REPETITION_PENALTY * 1.0001),
    ],
)
def test_float32_degenerate_values_rejected(field, value):
    with pytest.raises(ValidationError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field and info.value.allowed


def test_tiny_temperature_rejected_before_sampling():
    with pytest.raises(ValidationError, match="temperature"):
        Sampler(seed=0)(torch.zeros(1, V), SamplingParams(temperature=1e-320))


# ---- 4: huge ints, 0-d arrays / tensors -------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
     "frequency_penalty"],
)  # fmt: skip
@pytest.mark.parametrize("value", [10**400, -(10**400)])
def test_huge_int_for_float_field(field, value):
    with pytest.raises(ValidationError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_huge_int_logit_bias_value():
    with pytest.raises(ValidationError, match="logit_bias"):
        SamplingParams(logit_bias={1: 10**400})


@pytest.mark.parametrize("field", ["stop_token_ids", "allowed_token_ids", "bad_token_ids"])
@pytest.mark.parametrize("value", [np.array(3), torch.tensor(3)], ids=["numpy0d", "torch0d"])
def test_zero_d_id_fields(field, value):
    with pytest.raises(ValidationError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


@pytest.mark.parametrize(
    "value",
    [np.array(3), torch.tensor(3), [(np.array(3), 1.0)], {torch.tensor(3): 1.0}],
    ids=["numpy0d", "torch0d", "numpy0d-key-pairs", "torch0d-key"],
)
def test_zero_d_logit_bias(value):
    with pytest.raises(ValidationError, match="logit_bias"):
        SamplingParams(logit_bias=value)


def test_numpy_integer_ids_still_accepted():
    p = SamplingParams(stop_token_ids=np.array([3, 4]), logit_bias={np.int64(2): 1.0})
    assert p.stop_token_ids == (3, 4) and p.logit_bias == ((2, 1.0),)
    assert all(type(t) is int for t in p.stop_token_ids)


# ---- 5: min_tokens that leaves nothing to sample ----------------------------------------------


@pytest.mark.parametrize(
    ("kw", "eos"),
    [
        ({"stop_token_ids": list(range(V)), "min_tokens": 2}, None),
        ({"allowed_token_ids": [7], "stop_token_ids": [7], "min_tokens": 3}, None),
        ({"allowed_token_ids": [EOS], "min_tokens": 3}, EOS),
        ({"allowed_token_ids": [EOS], "min_tokens": 3}, [EOS, 9]),
        ({"allowed_token_ids": [3, 4], "bad_token_ids": [3], "stop_token_ids": [4],
          "min_tokens": 1}, None),
        ({"bad_token_ids": range(V - 2), "stop_token_ids": [V - 2], "min_tokens": 1}, V - 1),
    ],
)  # fmt: skip
def test_min_tokens_conflict_rejected(kw, eos):
    with pytest.raises(ValidationError, match="min_tokens") as info:
        SamplingParams(**kw).validate_for_vocab(V, eos)
    assert info.value.param == "min_tokens"


@pytest.mark.parametrize(
    ("kw", "eos"),
    [
        ({"stop_token_ids": list(range(V - 1)), "min_tokens": 2}, None),  # V-1 is left
        ({"stop_token_ids": list(range(V)), "min_tokens": 0}, None),  # no min_tokens
        ({"allowed_token_ids": [EOS], "min_tokens": 3}, None),  # EOS not known
        ({"allowed_token_ids": [EOS], "min_tokens": 3, "ignore_eos": True}, EOS),
        ({"allowed_token_ids": [EOS, 8], "min_tokens": 3}, EOS),
    ],
)
def test_min_tokens_feasible_accepted(kw, eos):
    SamplingParams(**kw).validate_for_vocab(V, eos)


def test_min_tokens_conflict_rejected_by_standalone_sampler():
    p = SamplingParams(allowed_token_ids=[7], stop_token_ids=[7], min_tokens=3)
    with pytest.raises(ValidationError, match="min_tokens"):
        Sampler(seed=0)(_logits(), p)


def test_validate_for_vocab_eos_out_of_vocab():
    with pytest.raises(ValidationError, match="eos_token_id"):
        SamplingParams(min_tokens=1).validate_for_vocab(V, V)


# ---- 6: the standalone Sampler ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt_token_ids": [[1, V]]}, "prompt_token_ids"),
        ({"prompt_token_ids": [[-1]]}, "prompt_token_ids"),
        ({"prompt_token_ids": [[1.5]]}, "prompt_token_ids"),
        ({"prompt_token_ids": [np.array(3)]}, "prompt_token_ids"),
        ({"prompt_token_ids": 5}, "prompt_token_ids"),
        ({"output_token_ids": [[V + 10]]}, "output_token_ids"),
        ({"output_token_ids": [[-2]]}, "output_token_ids"),
        ({"eos_token_id": V}, "eos_token_id"),
        ({"eos_token_id": -1}, "eos_token_id"),
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"eos_token_id": True}, "eos_token_id"),
        ({"eos_token_id": 1.0}, "eos_token_id"),
    ],
)
def test_sampler_call_bad_token_ids(kwargs, param):
    p = SamplingParams(repetition_penalty=1.2, presence_penalty=0.5, min_tokens=2)
    with pytest.raises(ValidationError, match=param) as info:
        Sampler(seed=0)(_logits(), p, **kwargs)
    assert info.value.param.startswith(param)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"stop_token_ids": [V], "min_tokens": 1}, "stop_token_ids"),
        ({"stop_token_ids": [V]}, "stop_token_ids"),
        ({"logit_bias": {V: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [V]}, "allowed_token_ids"),
        ({"bad_token_ids": [V + 1]}, "bad_token_ids"),
    ],
)
def test_sampler_call_param_ids_outside_vocab(kw, param):
    with pytest.raises(ValidationError, match=param):
        Sampler(seed=0)(_logits(), SamplingParams(**kw))


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_above_vocab(field):
    p = SamplingParams(**{field: 10})
    with pytest.raises(ValidationError, match=field):
        p.validate_for_vocab(5)
    if field == "logprobs":
        with pytest.raises(ValidationError, match=field):
            Sampler(seed=0)(_logits(1, 5), p)
    SamplingParams(**{field: 5}).validate_for_vocab(5)


@pytest.mark.parametrize("params", [None, 3, "x", {"temperature": 1.0}, [None]])
def test_sampler_call_bad_params(params):
    with pytest.raises(ValidationError, match="params"):
        Sampler(seed=0)(_logits(), params)


@pytest.mark.parametrize(
    ("args", "param"),
    [
        (("cpu", 0), "vocab_size"),
        (("cpu", -3), "vocab_size"),
        (("cpu", 10.0), "vocab_size"),
        (("cpu", 2**31), "vocab_size"),
        (("cpu", 10, 0), "max_rows"),
        (("cpu", 10, -1), "max_rows"),
        (("cpu", 10, 2.5), "max_rows"),
        (("cpu", 10, True), "max_rows"),
        (("cpu", 10, 2**31), "max_rows"),
        (("nodev", 10), "device"),
        (("cuda:99999", 10), "device"),
        ((3.5, 10), "device"),
        ((None, 10), "device"),
    ],
)
def test_bind_bad_arguments(args, param):
    with pytest.raises(ValidationError, match=param) as info:
        Sampler().bind(*args)
    assert info.value.param == param


@pytest.mark.parametrize("value", [0, -1, 2**31, 2**40, 2.0, True, "4"])
def test_max_num_seqs_bounds(value):
    with pytest.raises(ValidationError, match="max_num_seqs"):
        Sampler(max_num_seqs=value)


# ---- boundary values still work ---------------------------------------------------------------


def test_boundary_values_accepted_and_sample():
    params = [
        SamplingParams(temperature=MIN_TEMPERATURE),
        SamplingParams(temperature=MAX_TEMPERATURE, bad_token_ids=[1]),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=MIN_TOP_P),
        SamplingParams(repetition_penalty=MIN_REPETITION_PENALTY),
        SamplingParams(repetition_penalty=MAX_REPETITION_PENALTY),
        SamplingParams(presence_penalty=-2, frequency_penalty=2),
        SamplingParams(stop_token_ids=list(range(V - 1)), min_tokens=5, logprobs=20),
        SamplingParams(allowed_token_ids=[EOS, 3], min_tokens=5, logit_bias={V - 1: 100}),
    ]
    logits = _logits(len(params)) * 10
    rows = len(params)
    prompts = [[0, V - 1]] * rows
    outputs = [np.array([2, 3])] * rows  # NumPy rows of ids are accepted
    sampler = Sampler(seed=0, max_num_seqs=rows)
    out = sampler(logits, params, prompt_token_ids=prompts, output_token_ids=outputs,
                  eos_token_id=EOS)  # fmt: skip
    assert not out.failed
    assert all(0 <= t < V for t in out.tokens)
    assert out.tokens[7] == V - 1  # every other id is a stop id before min_tokens
    assert out.tokens[8] == 3  # EOS is suppressed, 3 is the only other allowed id
    assert SamplingParams(temperature=-0.0).temperature == 0.0
    assert SamplingParams(temperature=10**3).temperature == 1000.0  # a plain int is fine
    Sampler(max_num_seqs=2**31 - 1)  # the upper bound itself (nothing allocated before bind)
    Sampler().bind("cpu", 1, 1)
    Sampler().bind(torch.device("cpu"), 2**10, None)
