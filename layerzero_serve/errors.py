"""Exceptions raised by layerzero_serve.

Every validation error is a ``ValueError`` subclass that names the offending parameter and the
range it must fall in, so callers can catch ``ValueError`` generically or ``ValidationError``
specifically and still show users an actionable message.
"""

from __future__ import annotations


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


class RequestRejectedError(ValidationError):
    """A request can never be served (too long for the model or for the whole KV pool)."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or a config field is not supported."""


class MissingWeightError(KeyError, ValueError):
    """A tensor the model needs is absent from the checkpoint (a KeyError for callers that
    catch that, and a ValueError like every other bad-input error)."""
