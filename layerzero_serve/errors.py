"""Exceptions raised by layerzero_serve.

Every validation error is a ``ValueError`` subclass that names the offending parameter and the
range it must fall in, so callers can catch ``ValueError`` generically or ``ValidationError``
specifically and still show users an actionable message.
"""

from __future__ import annotations

import numbers
from pathlib import Path


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


class KernelOutputError(RuntimeError):
    """A plug-in kernel returned junk: an attention ``run`` whose output is not a tensor of the
    query's shape, dtype and device, or a sampling ``sample`` whose output is not int ``[B]``
    token ids on the logits' device. The runtime treats it like the kernel raising: an
    automatic choice falls back to the next candidate, a locked one re-raises.

    CUDA graphs: raised on the host (shape/dtype/device checks only, no sync)."""


class RequestRejectedError(ValidationError):
    """A request can never be served (too long for the model or for the whole KV pool)."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or a config field is not supported."""


class MissingWeightError(KeyError, ValueError):
    """A tensor the model needs is absent from the checkpoint (a KeyError for callers that
    catch that, and a ValueError like every other bad-input error)."""


MODEL_ALLOWED = (
    "a local checkpoint directory (config.json + *.safetensors), a .gguf file, 'default' (the "
    "embedded model) or 'dummy:<preset>'"
)


class ModelPathError(ValidationError, FileNotFoundError):
    """``model`` does not lead to a loadable checkpoint: a missing path, a Hub id, a directory
    without ``config.json``, no weights, or an index naming an absent shard.

    A ``ValidationError`` (so a ``ValueError``) with ``param == "model"``, and a
    ``FileNotFoundError`` for callers that caught that before. ``problem`` says which case
    applies; ``path`` is the file or directory at fault.

    CUDA graphs: raised on the host, while loading, before anything is launched.
    """

    def __init__(
        self, value: object, problem: str, path: Path | str | None = None, hint: bool = True
    ) -> None:
        self.param = "model"
        self.value = str(value)
        self.allowed = MODEL_ALLOWED
        self.problem = problem
        self.path = None if path is None else Path(path)
        self._hint = hint
        msg = f"model={self.value!r}: {problem}" + (f"; pass {MODEL_ALLOWED}" if hint else "")
        ValueError.__init__(self, msg)  # not OSError's (errno, strerror) parsing

    def __reduce__(self):
        return (type(self), (self.value, self.problem, self.path, self._hint))


class InsufficientMemoryError(MemoryError, ValueError):
    """The model's weights do not fit in the memory still available on the target device.

    Raised before anything is allocated, instead of swapping or being killed by the
    out-of-memory killer part way through. A ``MemoryError`` and a ``ValueError`` (a bad
    ``model`` / ``dtype`` / ``device`` choice for this machine). ``needed`` and ``available``
    are bytes.

    CUDA graphs: raised on the host, before the model is built.
    """

    def __init__(self, model: str, needed: int, available: int, message: str) -> None:
        self.model, self.needed, self.available = model, needed, available
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.model, self.needed, self.available, str(self)))
