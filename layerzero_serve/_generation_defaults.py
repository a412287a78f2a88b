"""A checkpoint's ``generation_config.json`` as engine defaults: its EOS ids end generation
(as the model's own EOS does), and its sampling values (``temperature``, ``top_p``, ``top_k``,
``min_p``, ``repetition_penalty``, ``max_new_tokens``) form the ``SamplingParams`` used when a
request gives none, as vLLM does by default. ``do_sample`` is ignored (as in vLLM): a config
that sets a temperature means it. A value ``SamplingParams`` rejects is skipped with a
warning."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import SamplingParams

__all__ = ["default_sampling_params", "generation_eos_ids"]

logger = logging.getLogger("layerzero_serve")

# generation_config.json key -> SamplingParams field
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_eos_ids(
    generation_config: dict, *more: int | None, vocab_size: int | None = None
) -> tuple[int, ...]:
    """The EOS ids of ``generation_config`` (an int or a list) after ``more`` (the config's and
    the tokenizer's EOS), each once, in order; entries that are not ints are ignored, and so
    (with a warning) are ids outside ``[0, vocab_size)``: one bad id in a checkpoint's files
    must not make every request fail."""
    raw = generation_config.get("eos_token_id")
    listed = raw if isinstance(raw, Iterable) and not isinstance(raw, str) else [raw]
    ids = [*more, *listed]
    ints = dict.fromkeys(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
    if vocab_size is None:
        return tuple(ints)
    bad = [i for i in ints if not 0 <= i < vocab_size]
    if bad:
        logger.warning("EOS ids %s are outside the vocabulary [0, %d): ignored", bad, vocab_size)
    return tuple(i for i in ints if 0 <= i < vocab_size)


def default_sampling_params(generation_config: dict, source: str = "") -> SamplingParams:
    """``SamplingParams`` with the config's sampling values; logs what it took (once, at
    engine start-up)."""
    values: dict[str, object] = {}
    for key, field in _SAMPLING_KEYS.items():
        if generation_config.get(key) is None:
            continue
        try:
            SamplingParams(**{field: generation_config[key]})
        except ValidationError as e:
            logger.warning("generation_config.json: %s ignored (%s)", key, e)
            continue
        values[field] = generation_config[key]
    try:
        params = SamplingParams(**values)
    except ValidationError as e:  # valid one by one, not together (e.g. min_tokens bounds)
        logger.warning("generation_config.json: sampling defaults ignored (%s)", e)
        return SamplingParams()
    if values:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        logger.info(
            "generation_config.json of %s sets %s: the defaults of requests given no "
            "SamplingParams (pass SamplingParams() for the library's own)",
            source or "the model",
            shown,
        )
    return params
