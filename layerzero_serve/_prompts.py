"""Prompts in the shapes vLLM's offline API takes: a str, a list of token ids,
``{"prompt": str}`` or ``{"prompt_token_ids": list[int]}``; and the checks that tell which
shape a ``generate`` argument is (one prompt or a batch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from layerzero_serve.errors import ValidationError

__all__ = ["PROMPT_ALLOWED", "is_single_prompt", "parse_prompt"]

PROMPT_ALLOWED = (
    "a str, a list of token ids, {'prompt': str} or {'prompt_token_ids': list of token ids}"
)


def _is_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def is_single_prompt(prompts: object) -> bool:
    """One prompt (a str, a dict, or a non-empty list of ints) rather than a batch of them."""
    if isinstance(prompts, (str, Mapping)):
        return True
    return (
        isinstance(prompts, Sequence)
        and not isinstance(prompts, bytes)
        and bool(prompts)
        and all(_is_id(t) for t in prompts)
    )


def parse_prompt(prompt: object, tokenizer, param: str = "prompt") -> tuple[str | None, list]:
    """``(text, token_ids)`` of one prompt; ``text`` is None for a token-id prompt. Text is
    encoded with ``tokenizer`` (special tokens added, e.g. a BOS, as transformers and vLLM
    do). Token ids are returned as given (a list), for the engine's range checks. A
    ValidationError names ``param`` (``prompt``, ``prompts[2]``, ``prompts[2].prompt``...)."""
    if isinstance(prompt, Mapping):
        keys = set(prompt)
        if keys == {"prompt"}:
            return _text_prompt(prompt["prompt"], tokenizer, f"{param}.prompt")
        if keys == {"prompt_token_ids"}:
            ids = prompt["prompt_token_ids"]
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
                where = f"{param}.prompt_token_ids"
                raise ValidationError(where, type(ids).__name__, "a list of token ids")
            return None, list(ids)
        raise ValidationError(param, f"a dict with keys {sorted(map(str, keys))}", PROMPT_ALLOWED)
    if isinstance(prompt, str):
        return _text_prompt(prompt, tokenizer, param)
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise ValidationError(param, type(prompt).__name__, PROMPT_ALLOWED)
    return None, list(prompt)


def _text_prompt(text: object, tokenizer, param: str) -> tuple[str, list[int]]:
    if not isinstance(text, str):
        raise ValidationError(param, type(text).__name__, "a str")
    if tokenizer is None:
        raise ValidationError(
            param, "a str", "token ids: this model has no tokenizer (tokenizer.json)"
        )
    return text, tokenizer.encode(text)
