"""Argument checks of the KV cache manager's public methods: each raises a ValidationError (a
ValueError) naming the parameter and its range, before anything changes. The hot paths call
them only when a cheap type test fails, so well-formed calls pay two comparisons."""

from __future__ import annotations

import numbers

from layerzero_serve.errors import ValidationError, check_int
from layerzero_serve.types import Request

# Token counts and positions are int32 on the device: a count above this is never meaningful.
MAX_TOKENS = (1 << 31) - 1


def check_request(param: str, request: object) -> Request:
    """``request`` must be a ``types.Request`` (not its id, not a dict).

    CUDA graphs: host only."""
    if not isinstance(request, Request):
        raise ValidationError(param, type(request).__name__, "a layerzero_serve.types.Request")
    return request


def check_tokens(param: str, value: object) -> int:
    """A token count as an int in ``[0, MAX_TOKENS]`` (not a bool, not a float).

    CUDA graphs: host only."""
    return check_int(param, value, 0, MAX_TOKENS)


def check_counts(num_new_tokens: object, num_lookahead_tokens: object) -> tuple[int, int]:
    """Both counts of ``allocate_slots`` as ints in ``[0, MAX_TOKENS]`` (not bools), else a
    ValidationError naming them.

    CUDA graphs: host only."""
    values = (num_new_tokens, num_lookahead_tokens)
    if not all(
        not isinstance(v, bool) and isinstance(v, numbers.Integral) and 0 <= v <= MAX_TOKENS
        for v in values
    ):
        raise ValidationError(
            "num_new_tokens/num_lookahead_tokens",
            values,
            f"integers in [0, {MAX_TOKENS}] (not bools)",
        )
    return int(num_new_tokens), int(num_lookahead_tokens)


def check_request_id(request_id: object) -> str:
    if not isinstance(request_id, str):
        raise ValidationError("request_id", request_id, "a str")
    return request_id
