"""Per-request sampling parameters.

``SamplingParams`` is immutable and validated on construction: every out-of-range field raises
``ValidationError`` (a ``ValueError``) whose ``param`` is the field name and whose ``allowed``
says the accepted range. Integer fields reject ``bool`` (``True`` is not a token count) and
accept any integral number (Python ``int``, NumPy integers), stored as plain ``int``; float
fields reject NaN, infinities and ``bool`` and are stored as plain ``float``. Token-id fields
are checked against a model's vocabulary by :meth:`SamplingParams.validate_for_vocab`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from layerzero_serve.errors import ValidationError
from layerzero_serve.request import stop_set_of
from layerzero_serve.sampling import _validate as v
from layerzero_serve.sampling._validate import INT32_MAX, INT64_MAX, INT64_MIN, MAX_TOKEN_ID

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MAX_LOGPROBS",
    "MAX_N",
    "MAX_TOKENS",
    "MAX_TOKEN_ID",
    "MAX_TOP_K",
    "MAX_REPETITION_PENALTY",
    "MAX_TEMPERATURE",
    "MIN_REPETITION_PENALTY",
    "MIN_TEMPERATURE",
    "MIN_TOP_P",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_LEN",
    "SamplingParams",
]

MAX_N = 256
# Token counts and token ids are int32 on the device (positions, the sampler's tables), and no
# sequence is longer than max_model_len <= 2**31 - 1: larger values are rejected up front
# instead of overflowing a tensor at the first step.
MAX_TOKENS = INT32_MAX  # max_tokens and min_tokens
MAX_TOP_K = INT32_MAX  # top_k above the vocabulary size means "no top-k filtering"
MAX_LOGPROBS = 20
MAX_PENALTY = 2.0  # presence / frequency penalty range, as in the OpenAI API
MAX_BIAS = 100.0  # logit bias range, as in the OpenAI API
LOGPROBS_MODES = ("raw", "processed")
# Bounds that keep the float32 sampling math finite: a positive value below ~1.4e-45 is 0 in
# float32 (division by zero -> NaN), one above ~3.4e38 is inf (-inf / inf -> NaN).
MIN_TEMPERATURE = 1e-6  # 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]
MAX_TEMPERATURE = 1e6
MIN_TOP_P = 1e-6  # top_p in [MIN_TOP_P, 1]
MIN_REPETITION_PENALTY = 1e-6  # repetition_penalty in [MIN_, MAX_REPETITION_PENALTY]
MAX_REPETITION_PENALTY = 1e6
# Stop strings are searched in each step's new text plus the last (longest - 1) characters, so
# their length bounds the per-step host work; their count multiplies it.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_LEN = 1024  # characters, each


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next token of one request.

    Fields (defaults in brackets):

    * ``n`` [1]: sequences to generate for the request, 1..256 (they share the prompt's KV).
    * ``temperature`` [1.0]: 0 (greedy, argmax) or in [1e-6, 1e6] (``MIN_TEMPERATURE``,
      ``MAX_TEMPERATURE``). Logits are divided by it; values in (0, 1e-6) are rejected (they
      underflow float32 to 0 and would divide by zero).
    * ``top_p`` [1.0]: nucleus mass in [1e-6, 1] (``MIN_TOP_P``); 1 disables it. Keeps the
      smallest set of most likely tokens whose probability sums to at least ``top_p``.
    * ``top_k`` [0]: keep the ``top_k`` most likely tokens; 0 or -1 disables it, otherwise in
      [1, 2**31 - 1] (``MAX_TOP_K``). A value larger than the vocabulary is clamped to the
      vocabulary size (i.e. no filtering).
    * ``min_p`` [0.0]: in [0, 1]; drop tokens whose probability is below ``min_p`` times the
      probability of the most likely token (after temperature, top-k and top-p). 0 disables it.
    * ``seed`` [None]: int in the int64 range; a seeded request's tokens do not depend on its
      batch position or batch mates. None = a seed drawn from the sampler's own generator.
    * ``max_tokens`` [16]: maximum number of generated tokens, in [1, 2**31 - 1]
      (``MAX_TOKENS``; the model's ``max_model_len`` caps the sequence anyway).
    * ``stop_token_ids`` [()]: token ids (ints in [0, 2**31 - 1], ``MAX_TOKEN_ID``; the model's
      vocabulary is checked by :meth:`validate_for_vocab`) that end generation; any iterable of
      ints is accepted and stored as a tuple. Every token-id field below has the same range.
    * ``ignore_eos`` [False]: keep generating after the EOS token (bool).
    * ``repetition_penalty`` [1.0]: in [1e-6, 1e6] (``MIN_REPETITION_PENALTY``,
      ``MAX_REPETITION_PENALTY``, so the float32 logits stay finite); for every token in the
      prompt or the output so far, a positive logit is divided by it and a negative one
      multiplied (1 = off).
    * ``presence_penalty`` [0.0], ``frequency_penalty`` [0.0]: in [-2, 2]; subtracted from the
      logit of every token of the *output* so far, once (presence) or once per occurrence
      (frequency).
    * ``logit_bias`` [None]: dict token id -> bias in [-100, 100], added to the logits; stored as
      ``((id, bias), ...)`` sorted by id.
    * ``min_tokens`` [0]: in [0, max_tokens]; EOS and the stop ids cannot be sampled before this
      many output tokens. :meth:`validate_for_vocab` rejects a ``min_tokens > 0`` that leaves
      no token to sample before it (allowed ids minus bad ids, stop ids and EOS is empty).
    * ``allowed_token_ids`` [None]: only these ids can be sampled (a non-empty iterable).
    * ``bad_token_ids`` [()]: these ids are never sampled.
    * ``logprobs`` [None]: None = off; n in [0, 20] (and <= the vocabulary size, checked by
      :meth:`validate_for_vocab`): each output token comes with its logprob, rank and the ``n``
      most likely tokens' logprobs.
    * ``prompt_logprobs`` [None]: the same for every prompt token (from the model's raw logits).
    * ``logprobs_mode`` ["raw"]: "raw" = log-softmax of the model's logits; "processed" = of the
      distribution actually sampled from (after penalties, bias, masks, temperature and filters;
      ``-inf`` outside the kept set; greedy rows: the processed logits without temperature).
    * ``stop`` [()]: a str or a list of str; generation ends when the decoded output text
      contains one of them (checked across token boundaries; ``finish_reason="stop"``,
      ``stop_reason`` = the string). At most 64 strings (``MAX_STOP_STRINGS``) of 1 to 1,024
      characters each (``MAX_STOP_STRING_LEN``); stored as a tuple. Needs a tokenizer and
      ``detokenize``.
    * ``include_stop_str_in_output`` [False]: keep the stop string at the end of the text (by
      default the text ends just before it).
    * ``skip_special_tokens`` [True]: leave special tokens (BOS, EOS, chat markers) out of the
      text.
    * ``detokenize`` [True]: produce text (incrementally, per step); False streams token ids
      only and costs no host work per token (``stop`` must then be empty).

    Processing order (``sampling.processors``): logit bias and allowed/bad masks, the
    min-tokens mask, then the penalties; then greedy argmax or temperature -> top-k -> top-p ->
    min-p -> draw.

    CUDA graphs: a host object; the sampler turns a batch's params into device tensors outside
    capture.
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
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    allowed_token_ids: tuple[int, ...] | None = None
    bad_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw"
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise through object.__setattr__

        allowed = f"int in [1, {MAX_N}]"
        n = v.as_int("n", self.n, allowed)
        if not 1 <= n <= MAX_N:
            raise ValidationError("n", self.n, allowed)
        set_(self, "n", n)

        allowed = f"0 (greedy) or float in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
        temperature = v.as_float("temperature", self.temperature, allowed)
        if temperature != 0.0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise ValidationError("temperature", self.temperature, allowed)
        set_(self, "temperature", temperature if temperature != 0.0 else 0.0)  # -0.0 -> 0.0

        allowed = f"float in [{MIN_TOP_P:g}, 1]"
        set_(self, "top_p", v.float_in("top_p", self.top_p, MIN_TOP_P, 1.0, allowed))

        allowed = f"int: -1 or 0 (disabled) or in [1, {MAX_TOP_K}]"
        top_k = v.as_int("top_k", self.top_k, allowed)
        if not -1 <= top_k <= MAX_TOP_K:
            raise ValidationError("top_k", self.top_k, allowed)
        set_(self, "top_k", top_k)

        set_(self, "min_p", v.float_in("min_p", self.min_p, 0.0, 1.0, "float in [0, 1]"))

        if self.seed is not None:
            allowed = f"None or int in [{INT64_MIN}, {INT64_MAX}]"
            seed = v.as_int("seed", self.seed, allowed)
            if not INT64_MIN <= seed <= INT64_MAX:
                raise ValidationError("seed", self.seed, allowed)
            set_(self, "seed", seed)

        allowed = f"int in [1, {MAX_TOKENS}]"
        max_tokens = v.as_int("max_tokens", self.max_tokens, allowed)
        if not 1 <= max_tokens <= MAX_TOKENS:
            raise ValidationError("max_tokens", self.max_tokens, allowed)
        set_(self, "max_tokens", max_tokens)

        set_(self, "stop_token_ids", v.token_ids("stop_token_ids", self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise ValidationError("ignore_eos", self.ignore_eos, "bool")
        self._check_processors(set_)
        self._check_logprobs(set_)
        self._check_text(set_)

    def _check_processors(self, set_) -> None:
        lo, hi = MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY
        allowed = f"float in [{lo:g}, {hi:g}] (1 = off)"
        rep = v.float_in("repetition_penalty", self.repetition_penalty, lo, hi, allowed)
        set_(self, "repetition_penalty", rep)
        for name in ("presence_penalty", "frequency_penalty"):
            allowed = f"float in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0 = off)"
            value = v.float_in(name, getattr(self, name), -MAX_PENALTY, MAX_PENALTY, allowed)
            set_(self, name, value)
        set_(self, "logit_bias", v.logit_bias(self.logit_bias, MAX_BIAS))

        allowed = f"int in [0, max_tokens={self.max_tokens}]"
        min_tokens = v.as_int("min_tokens", self.min_tokens, allowed)
        if not 0 <= min_tokens <= self.max_tokens:
            raise ValidationError("min_tokens", self.min_tokens, allowed)
        set_(self, "min_tokens", min_tokens)

        if self.allowed_token_ids is not None:
            ids = v.token_ids("allowed_token_ids", self.allowed_token_ids)
            if not ids:
                raise ValidationError("allowed_token_ids", ids, "None or at least one token id")
            set_(self, "allowed_token_ids", ids)
        set_(self, "bad_token_ids", v.token_ids("bad_token_ids", self.bad_token_ids))

    def _check_logprobs(self, set_) -> None:
        set_(self, "logprobs", v.optional_count("logprobs", self.logprobs, MAX_LOGPROBS))
        set_(
            self,
            "prompt_logprobs",
            v.optional_count("prompt_logprobs", self.prompt_logprobs, MAX_LOGPROBS),
        )
        if not isinstance(self.logprobs_mode, str) or self.logprobs_mode not in LOGPROBS_MODES:
            raise ValidationError("logprobs_mode", self.logprobs_mode, " or ".join(LOGPROBS_MODES))

    def _check_text(self, set_) -> None:
        set_(self, "stop", v.stop_strings(self.stop, MAX_STOP_STRINGS, MAX_STOP_STRING_LEN))
        for name in ("include_stop_str_in_output", "skip_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(name, getattr(self, name), "a bool")
        if self.stop and not self.detokenize:
            raise ValidationError(
                "stop", self.stop, "() when detokenize=False (stop strings are matched on text)"
            )

    # ---- derived -------------------------------------------------------------------------------

    @property
    def max_stop_len(self) -> int:
        """Length in characters of the longest stop string (0 without stop strings)."""
        return max(map(len, self.stop), default=0)

    @property
    def is_greedy(self) -> bool:
        """True when sampling reduces to argmax: ``temperature == 0`` or ``top_k == 1``."""
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def has_token_mask(self) -> bool:
        """Logit bias, allowed or bad ids: a per-request additive row over the vocabulary."""
        has_ids = self.allowed_token_ids is not None or bool(self.bad_token_ids)
        return bool(self.logit_bias) or has_ids

    def validate_for_vocab(
        self, vocab_size: int, eos_token_ids: int | Iterable[int] | None = None
    ) -> None:
        """Check every token-id field against a vocabulary of ``vocab_size`` tokens.

        Raises ``ValidationError`` naming the field (``stop_token_ids``, ``logit_bias``,
        ``allowed_token_ids``, ``bad_token_ids``) for an id outside ``[0, vocab_size)``, or when
        the allowed and bad ids leave no token to sample; ``logprobs`` / ``prompt_logprobs``
        above ``vocab_size``; ``min_tokens`` when it is > 0 and no token can be sampled before
        it: the allowed ids (all ids when None) minus the bad ids, the stop ids and, unless
        ``ignore_eos``, ``eos_token_ids`` (the model's EOS id or ids, when the caller knows
        them) are empty. ``ValidationError("vocab_size", ...)`` when ``vocab_size`` is not an
        int >= 1; ``ValidationError("eos_token_id", ...)`` for an EOS id outside the vocabulary.
        Runs once per request (host, O(number of ids)).
        """
        vocab = v.as_int("vocab_size", vocab_size, "int >= 1")
        if vocab < 1:
            raise ValidationError("vocab_size", vocab_size, "int >= 1")
        v.ids_in_vocab("stop_token_ids", self.stop_token_ids, vocab, self.stop_token_ids)
        bias_ids = [t for t, _ in self.logit_bias]
        v.ids_in_vocab("logit_bias", bias_ids, vocab, dict(self.logit_bias))
        allowed = self.allowed_token_ids
        if allowed is not None:
            v.ids_in_vocab("allowed_token_ids", allowed, vocab, allowed)
        v.ids_in_vocab("bad_token_ids", self.bad_token_ids, vocab, self.bad_token_ids)
        bad = set(self.bad_token_ids)
        if (len(bad) >= vocab) if allowed is None else set(allowed) <= bad:
            raise ValidationError(
                "bad_token_ids",
                self.bad_token_ids,
                "ids that leave at least one token to sample (allowed_token_ids minus these)",
            )
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and n > vocab:
                limit = min(MAX_LOGPROBS, vocab)
                raise ValidationError(name, n, f"None or int in [0, {limit}] (vocab_size={vocab})")
        if eos_token_ids is None:
            eos: tuple[int, ...] = ()
        elif isinstance(eos_token_ids, Iterable):
            eos = tuple(v.token_id("eos_token_id", t, vocab) for t in eos_token_ids)
        else:
            eos = (v.token_id("eos_token_id", eos_token_ids, vocab),)
        if self.min_tokens > 0:
            blocked = bad | stop_set_of(self.stop_token_ids, eos, self.ignore_eos)
            if (len(blocked) >= vocab) if allowed is None else set(allowed) <= blocked:
                raise ValidationError(
                    "min_tokens",
                    self.min_tokens,
                    "0 when no token can be sampled before min_tokens (allowed_token_ids, or "
                    "the whole vocabulary, minus bad_token_ids, stop_token_ids and EOS is empty)",
                )
