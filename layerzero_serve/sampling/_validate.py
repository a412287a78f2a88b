"""Field checks shared by SamplingParams: each raises ``ValidationError(param, value, allowed)``
and returns the value normalised to a plain Python type (``int``, ``float``, tuples)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

from layerzero_serve.errors import ValidationError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# Token ids, token counts and positions are int32 on the device: a token id or a count above
# this is rejected when the params are built, before it can overflow a tensor.
INT32_MAX = 2**31 - 1
MAX_TOKEN_ID = INT32_MAX


def as_int(param: str, value: object, allowed: str) -> int:
    """An integral number (not ``bool``) as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValidationError(param, value, allowed, f"expected an int, got {type(value).__name__}")
    return int(value)


def as_float(param: str, value: object, allowed: str) -> float:
    """A finite real number (not ``bool``) as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(
            param, value, allowed, f"expected a float, got {type(value).__name__}"
        )
    try:
        f = float(value)
    except (OverflowError, ValueError, TypeError):  # e.g. 10**400: too large for a float
        raise ValidationError(param, value, allowed, "must be finite") from None
    if not math.isfinite(f):
        raise ValidationError(param, value, allowed, "must be finite")
    return f


def float_in(param: str, value: object, lo: float, hi: float, allowed: str) -> float:
    f = as_float(param, value, allowed)
    if not lo <= f <= hi:
        raise ValidationError(param, value, allowed)
    return f


def optional_count(param: str, value: object, hi: int) -> int | None:
    """``None`` or an int in ``[0, hi]``."""
    if value is None:
        return None
    allowed = f"None or int in [0, {hi}]"
    n = as_int(param, value, allowed)
    if not 0 <= n <= hi:
        raise ValidationError(param, value, allowed)
    return n


def token_ids(param: str, value: object) -> tuple[int, ...]:
    """Any iterable of ints in ``[0, MAX_TOKEN_ID]`` (not a string) as a tuple."""
    allowed = f"iterable of ints in [0, {MAX_TOKEN_ID}]"
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
        raise ValidationError(param, value, allowed)
    try:
        ids = tuple(value)
    except Exception as e:  # a 0-d array or tensor (iterable type, not iterable value), or an
        # iterator that raises while iterated
        raise ValidationError(param, value, allowed, f"not iterable: {e}") from None
    out = []
    for i, tok in enumerate(ids):
        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
            raise ValidationError(param, ids, allowed, f"index {i} is {type(tok).__name__}")
        if not 0 <= tok <= MAX_TOKEN_ID:
            raise ValidationError(param, ids, allowed, f"id {tok} at index {i}")
        out.append(int(tok))
    return tuple(out)


def logit_bias(value: object, limit: float) -> tuple[tuple[int, float], ...]:
    """A mapping (or iterable of pairs) token id -> finite bias in ``[-limit, limit]``, as pairs
    sorted by token id (hashable, so SamplingParams stays hashable)."""
    allowed = (
        f"None or a dict token id (int in [0, {MAX_TOKEN_ID}]) -> float in [-{limit:g}, {limit:g}]"
    )
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Iterable) and not isinstance(value, (str, bytes, bytearray)):
        try:
            items = list(value)
        except TypeError:  # a 0-d NumPy array or tensor
            raise ValidationError("logit_bias", value, allowed, "not iterable") from None
    else:
        raise ValidationError("logit_bias", value, allowed)
    out: dict[int, float] = {}
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValidationError("logit_bias", value, allowed, f"entry {item!r}")
        tok, bias = item
        if (
            isinstance(tok, bool)
            or not isinstance(tok, numbers.Integral)
            or not 0 <= tok <= MAX_TOKEN_ID
        ):
            raise ValidationError("logit_bias", value, allowed, f"key {tok!r}")
        out[int(tok)] = float_in("logit_bias", bias, -limit, limit, allowed)
    return tuple(sorted(out.items()))


def ids_in_vocab(param: str, ids: Iterable[int], vocab: int, shown: object) -> None:
    allowed = f"token ids in [0, {vocab})"
    for i, tok in enumerate(ids):
        if not 0 <= tok < vocab:
            raise ValidationError(param, shown, allowed, f"id {tok} at index {i}")


def int_in(param: str, value: object, lo: int, hi: int) -> int:
    """An int in ``[lo, hi]``."""
    allowed = f"int in [{lo}, {hi}]"
    n = as_int(param, value, allowed)
    if not lo <= n <= hi:
        raise ValidationError(param, value, allowed)
    return n


def token_id(param: str, value: object, vocab: int) -> int:
    """One token id in ``[0, vocab)`` as ``int``."""
    return int_in(param, value, 0, vocab - 1)


def token_ids_in_vocab(param: str, value: object, vocab: int) -> list[int]:
    """An iterable of token ids in ``[0, vocab)`` (a 1-D tensor or array too) as a list."""
    if hasattr(value, "tolist") and getattr(value, "ndim", None) == 1:
        value = value.tolist()  # 1-D torch tensor / NumPy array of ids
    ids = token_ids(param, value)
    ids_in_vocab(param, ids, vocab, ids if len(ids) <= 16 else f"<{len(ids)} token ids>")
    return list(ids)


def stop_strings(value: object, max_count: int, max_len: int) -> tuple[str, ...]:
    """``stop``: a str or an iterable of str, each 1..``max_len`` characters, at most
    ``max_count`` of them, as a tuple (a str is one stop string, not its characters)."""
    allowed = f"a str or a list of at most {max_count} str, each 1 to {max_len} characters"
    if isinstance(value, str):
        items: tuple = (value,)
    elif isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise ValidationError("stop", value, allowed)
    else:
        try:
            items = tuple(value)
        except Exception as e:  # an iterator that raises while iterated
            raise ValidationError("stop", value, allowed, f"not iterable: {e}") from None
    if len(items) > max_count:
        raise ValidationError("stop", f"{len(items)} strings", allowed)
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise ValidationError(f"stop[{i}]", s, allowed, f"got {type(s).__name__}")
        if not 1 <= len(s) <= max_len:
            shown = s if len(s) <= 40 else f"{s[:40]}... ({len(s)} characters)"
            raise ValidationError(f"stop[{i}]", shown, allowed)
    return items
