"""Exceptions raised by layerzero_serve.

Every validation error is a ``ValueError`` subclass that names the offending parameter and the
range it must fall in, so callers can catch ``ValueError`` generically or ``ValidationError``
specifically and still show users an actionable message.
"""

from __future__ import annotations

import numbers


class ValidationError(ValueError):
    """A public input is out of range.

    Attributes:
        param: name of the parameter (``"top_p"``, ``"prompt_token_ids[3]"``...).
        allowed: human-readable allowed range (``"(0, 1]"``).
        value: the rejected value.

    CUDA graphs: raised on the host, before anything is launched.
    """

    def __init__(self, param: str, value: object, allowed: str, detail: str = "") -> None:
        self.param = param
        self.value = value
        self.allowed = allowed
        msg = f"{param}={value!r} is invalid; allowed: {allowed}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as a plain ``int`` in ``[low, high]`` (no upper bound when ``high`` is None);
    numpy integers pass, bools and non-integral numbers do not. Raises ValidationError naming
    ``name``. Host only."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value > high)
    ):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ValidationError(name, value, allowed)
    return int(value)


class RequestRejectedError(ValidationError):
    """A request can never be served (too long for the model or for the whole KV pool)."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or a config field is not supported."""


class MissingWeightError(KeyError, ValueError):
    """A tensor the model needs is absent from the checkpoint (a KeyError for callers that
    catch that, and a ValueError like every other bad-input error)."""
