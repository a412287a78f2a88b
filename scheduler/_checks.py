"""Argument checks of the scheduler's public methods. Each raises a ValidationError (a
ValueError) naming the parameter and its range before the scheduler changes anything.

Pure CPU: imports only the shared types and errors.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from layerzero_serve.errors import ValidationError
from layerzero_serve.types import Request, SchedulerOutput, check_token_ids

# Token ids, token counts and positions are int32 on the device.
INT32_MAX = (1 << 31) - 1
PRIORITY_BOUND = INT32_MAX  # priorities are ints in [-PRIORITY_BOUND, PRIORITY_BOUND]


def check_request_id(request_id: object) -> str:
    """CUDA graphs: host only."""
    if not isinstance(request_id, str):
        raise ValidationError("request_id", request_id, "a str")
    return request_id


def check_request(request: object) -> Request:
    """A ``types.Request`` whose prompt ids fit the device's int32 (``[0, 2**31 - 1]``); the
    other fields of its description (id, max_tokens, priority, EOS and stop ids, salt...)
    were validated when it was built (``RequestDescription``). Once per request (O(prompt)).

    CUDA graphs: host only."""
    if not isinstance(request, Request):
        raise ValidationError("request", type(request).__name__, "a layerzero_serve.types.Request")
    check_token_ids("prompt_token_ids", request.prompt_token_ids)  # int32 on the device
    return request


def _bad_row(i: int, toks: object) -> ValidationError | None:
    """Why row ``i`` is not a sequence of token ids (None when it is one)."""
    allowed = f"a list of token ids (ints in [0, {INT32_MAX}])"
    if isinstance(toks, (str, bytes)) or not isinstance(toks, Sequence):
        return ValidationError(f"new_token_ids[{i}]", type(toks).__name__, allowed)
    for t in toks:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= INT32_MAX:
            return ValidationError(f"new_token_ids[{i}]", t, allowed)
    return None


def check_update(output: object, new_token_ids: object, rows: bool = True) -> None:
    """``update``'s arguments, all rows before any is applied: a SchedulerOutput whose columns
    agree, and exactly one row per scheduled request (O(1)); with ``rows``, each row a list of
    token ids (one type test per decode row on the fast path, ~0.1 us per row).

    CUDA graphs: host only."""
    if not isinstance(output, SchedulerOutput):
        raise ValidationError("output", type(output).__name__, "the SchedulerOutput of schedule()")
    num_rows = len(output.requests)
    if len(output.starts) != num_rows or len(output.num_scheduled) != num_rows:
        raise ValidationError(
            "output", "columns of different lengths", "a SchedulerOutput as schedule() made it"
        )
    if isinstance(new_token_ids, (str, bytes)) or not isinstance(new_token_ids, Sequence):
        raise ValidationError(
            "new_token_ids", type(new_token_ids).__name__, "a sequence of rows of token ids"
        )
    if len(new_token_ids) != num_rows:
        raise ValidationError(
            "new_token_ids",
            f"{len(new_token_ids)} rows",
            f"exactly one per scheduled request ({num_rows})",
        )
    if not rows:
        return
    for i, toks in enumerate(new_token_ids):
        # fast path: a list of one int (a decode row), or an empty list (a prefill chunk)
        if type(toks) is list and (
            not toks or (len(toks) == 1 and type(toks[0]) is int and 0 <= toks[0] <= INT32_MAX)
        ):
            continue
        err = _bad_row(i, toks)
        if err is not None:
            raise err
