"""Per-request sampling parameters.

``SamplingParams`` is immutable and validated on construction: every out-of-range field raises
``ValidationError`` (a ``ValueError``) whose ``param`` is the field name and whose ``allowed``
says the accepted range. Integer fields reject ``bool`` (``True`` is not a token count) and
accept any integral number (Python ``int``, NumPy integers), stored as plain ``int``; float
fields reject NaN, infinities and ``bool`` and are stored as plain ``float``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from layerzero_serve.errors import ValidationError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_N = 256


def _as_int(param: str, value: object, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValidationError(param, value, allowed, f"expected an int, got {type(value).__name__}")
    return int(value)


def _as_float(param: str, value: object, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(
            param, value, allowed, f"expected a float, got {type(value).__name__}"
        )
    f = float(value)
    if not math.isfinite(f):
        raise ValidationError(param, value, allowed, "must be finite")
    return f


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token of one request.

    Fields (defaults in brackets):

    * ``n`` [1]: sequences to generate for the request, 1..256.
    * ``temperature`` [1.0]: finite, >= 0. Logits are divided by it; 0 means greedy (argmax).
    * ``top_p`` [1.0]: nucleus mass in (0, 1]; 1 disables it. Keeps the smallest set of most
      likely tokens whose probability sums to at least ``top_p``.
    * ``top_k`` [0]: keep the ``top_k`` most likely tokens; 0 or -1 disables it, otherwise >= 1.
      A value larger than the vocabulary is clamped to the vocabulary size (i.e. no filtering).
    * ``min_p`` [0.0]: in [0, 1]; drop tokens whose probability is below ``min_p`` times the
      probability of the most likely token (after temperature, top-k and top-p). 0 disables it.
    * ``seed`` [None]: int in the int64 range; a seeded request draws from its own generator so
      its output does not depend on the rest of the batch. None = the sampler's generator.
    * ``max_tokens`` [16]: maximum number of generated tokens, >= 1.
    * ``stop_token_ids`` [()]: token ids (non-negative ints) that end generation; any iterable of
      ints is accepted and stored as a tuple. Check them against the model with
      :meth:`validate_for_vocab`.
    * ``ignore_eos`` [False]: keep generating after the EOS token (bool).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise through object.__setattr__

        allowed = f"int in [1, {MAX_N}]"
        n = _as_int("n", self.n, allowed)
        if not 1 <= n <= MAX_N:
            raise ValidationError("n", self.n, allowed)
        set_(self, "n", n)

        allowed = "finite float >= 0 (0 = greedy)"
        temperature = _as_float("temperature", self.temperature, allowed)
        if temperature < 0.0:
            raise ValidationError("temperature", self.temperature, allowed)
        set_(self, "temperature", temperature)

        allowed = "float in (0, 1]"
        top_p = _as_float("top_p", self.top_p, allowed)
        if not 0.0 < top_p <= 1.0:
            raise ValidationError("top_p", self.top_p, allowed)
        set_(self, "top_p", top_p)

        allowed = "int: -1 or 0 (disabled) or >= 1"
        top_k = _as_int("top_k", self.top_k, allowed)
        if top_k < -1:
            raise ValidationError("top_k", self.top_k, allowed)
        set_(self, "top_k", top_k)

        allowed = "float in [0, 1]"
        min_p = _as_float("min_p", self.min_p, allowed)
        if not 0.0 <= min_p <= 1.0:
            raise ValidationError("min_p", self.min_p, allowed)
        set_(self, "min_p", min_p)

        if self.seed is not None:
            allowed = f"None or int in [{INT64_MIN}, {INT64_MAX}]"
            seed = _as_int("seed", self.seed, allowed)
            if not INT64_MIN <= seed <= INT64_MAX:
                raise ValidationError("seed", self.seed, allowed)
            set_(self, "seed", seed)

        allowed = "int >= 1"
        max_tokens = _as_int("max_tokens", self.max_tokens, allowed)
        if max_tokens < 1:
            raise ValidationError("max_tokens", self.max_tokens, allowed)
        set_(self, "max_tokens", max_tokens)

        set_(self, "stop_token_ids", _normalise_stop_ids(self.stop_token_ids))

        if not isinstance(self.ignore_eos, bool):
            raise ValidationError("ignore_eos", self.ignore_eos, "bool")

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax: ``temperature == 0`` or ``top_k == 1``."""
        return self.temperature == 0.0 or self.top_k == 1

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Check ``stop_token_ids`` against a vocabulary of ``vocab_size`` tokens.

        Raises ``ValidationError("stop_token_ids", ...)`` for an id outside ``[0, vocab_size)``
        and ``ValidationError("vocab_size", ...)`` when ``vocab_size`` is not an int >= 1.
        """
        vocab = _as_int("vocab_size", vocab_size, "int >= 1")
        if vocab < 1:
            raise ValidationError("vocab_size", vocab_size, "int >= 1")
        allowed = f"token ids in [0, {vocab})"
        for i, tok in enumerate(self.stop_token_ids):
            if not 0 <= tok < vocab:
                raise ValidationError(
                    "stop_token_ids", self.stop_token_ids, allowed, f"id {tok} at index {i}"
                )


def _normalise_stop_ids(value: object) -> tuple[int, ...]:
    allowed = "iterable of ints >= 0"
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
        raise ValidationError("stop_token_ids", value, allowed)
    ids = tuple(value)
    out = []
    for i, tok in enumerate(ids):
        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
            raise ValidationError(
                "stop_token_ids", ids, allowed, f"index {i} is {type(tok).__name__}"
            )
        if tok < 0:
            raise ValidationError("stop_token_ids", ids, allowed, f"id {tok} at index {i}")
        out.append(int(tok))
    return tuple(out)
