"""Offline generation: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from layerzero_serve.engine import Engine
from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import SamplingParams, token_ids_in_vocab
from layerzero_serve.types import TokenLogprob

logger = logging.getLogger("layerzero_serve")

Prompt = str | Sequence[int]


@dataclass(slots=True)
class Completion:
    """One sample of a prompt (``logprobs``: one entry per token when requested)."""

    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class GenerationResult:
    """Everything ``generate`` returns for one prompt (``outputs`` has ``n`` samples).

    Timing fields are seconds from ``time.monotonic()``: arrival, first token, finish.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion]
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when requested

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str | None:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


def load_tokenizer(model_dir: Path | None):
    """The checkpoint's ``tokenizer.json`` through the ``tokenizers`` library, or None; a file
    the library cannot parse raises ``UnsupportedModelError`` naming it."""
    from layerzero_serve._model_source import load_checkpoint_tokenizer

    return load_checkpoint_tokenizer(model_dir)


class LLM:
    """Offline batch generation over an Engine. ``LLM()`` uses the embedded default model.

    Args:
        model: checkpoint directory, ``dummy:<preset>`` or ``"default"``.
        **config: any EngineConfig field (``dtype``, ``device``, ``max_num_seqs``...).

    CUDA graphs: a host loop over ``Engine``; never call it inside a capture.
    """

    def __init__(self, model: str | Path = "default", **config: object) -> None:
        if not isinstance(model, (str, os.PathLike)):
            allowed = "a checkpoint directory (str or path), 'dummy:<preset>' or 'default'"
            raise ValidationError("model", model, allowed)
        if "config" in config:  # Engine's own parameter: not an EngineConfig field
            raise ValidationError("config", config["config"], "EngineConfig fields as keywords")
        self.engine = Engine(model, **config)
        self.tokenizer = load_tokenizer(self.engine.model_dir)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (a str; ValidationError naming ``text`` otherwise, or when
        the model has no tokenizer)."""
        if not isinstance(text, str):
            raise ValidationError("text", type(text).__name__, "a str")
        if self.tokenizer is None:
            raise ValidationError(
                "prompts", "a string", "token id lists (this model has no tokenizer.json)"
            )
        return self.tokenizer.encode(text).ids

    def decode(self, token_ids: Sequence[int]) -> str | None:
        """The text of ``token_ids`` (ints in ``[0, vocab_size)``, a list, tuple or 1-D
        array; ValidationError naming ``token_ids`` otherwise); None without a tokenizer."""
        return self._text(token_ids_in_vocab("token_ids", token_ids, self.engine.vocab_size))

    def _text(self, ids: list[int]) -> str | None:
        """``decode`` of ids the engine produced (already valid)."""
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _normalise(self, prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        allowed = "a str, a list of token ids, or a list of those"
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
            raise ValidationError("prompts", type(prompts).__name__, allowed)
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # a single token-id prompt
        for i, p in enumerate(prompts):
            if not isinstance(p, str) and (isinstance(p, bytes) or not isinstance(p, Sequence)):
                raise ValidationError(f"prompts[{i}]", type(p).__name__, allowed)
        return prompts

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerationResult]:
        """Generate for every prompt (strings or token id lists); results in prompt order.

        A bad prompt or parameter raises before any request is queued. The engine must be idle:
        requests added through ``llm.engine`` directly are driven by their caller. If anything
        raises part way (or the call is interrupted), every request of this call is aborted
        and reported before the exception propagates: the engine is left idle.
        """
        if not isinstance(use_tqdm, bool):
            raise ValidationError("use_tqdm", use_tqdm, "a bool")
        items = self._normalise(prompts)
        if self.engine.has_unfinished():
            pending = len(self.engine.scheduler.requests)
            raise ValidationError(
                "engine",
                f"{pending} unfinished requests added through llm.engine",
                "an idle engine (finish or abort them first)",
            )
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(items)
        else:
            if isinstance(sampling_params, (str, bytes)) or not isinstance(
                sampling_params, Sequence
            ):
                raise ValidationError(
                    "sampling_params", type(sampling_params).__name__, "a SamplingParams or a list"
                )
            params = list(sampling_params)
            for i, sp in enumerate(params):
                if not isinstance(sp, SamplingParams):
                    raise ValidationError(
                        f"sampling_params[{i}]", type(sp).__name__, "a SamplingParams"
                    )
            if len(params) != len(items):
                raise ValidationError(
                    "sampling_params",
                    f"{len(params)} items",
                    f"one SamplingParams or {len(items)} (one per prompt)",
                )
        encoded = [self.encode(p) if isinstance(p, str) else list(p) for p in items]
        for i, ids in enumerate(encoded):  # validate all before queueing any
            try:
                self.engine._validate_prompt(ids)
                self.engine._validate_params(params[i])
            except ValidationError as e:
                raise type(e)(f"prompts[{i}]: {e.param}", e.value, e.allowed) from None
        return self._run(items, encoded, params, use_tqdm)

    def _run(self, items, encoded, params, use_tqdm) -> list[GenerationResult]:
        results: dict[str, GenerationResult] = {}
        try:
            return self._drive(items, encoded, params, use_tqdm, results)
        except BaseException:
            self._abort_all(list(results))
            raise

    def _abort_all(self, request_ids: list[str]) -> None:
        """Abort this call's requests and step until their ends are reported, so the engine is
        idle again (it was idle when the call began). A failure while doing so is logged, the
        original exception is what the caller sees."""
        eng = self.engine
        try:
            for rid in request_ids:
                eng.abort(rid)
            for _ in range(len(request_ids) + 2):  # nothing runs now: one step reports them
                if not eng.has_unfinished():
                    break
                eng.step()
        except Exception as e:  # pragma: no cover - only when the engine itself is broken
            logger.warning(
                "generate: cleaning up after an error failed: %s: %s", type(e).__name__, e
            )

    def _drive(self, items, encoded, params, use_tqdm, results) -> list[GenerationResult]:
        eng = self.engine
        sample_slot: dict[str, tuple[str, int]] = {}
        now = time.monotonic()
        for prompt, ids, sp in zip(items, encoded, params, strict=True):
            rid = eng.add_request(ids, sp)
            results[rid] = GenerationResult(
                rid,
                prompt if isinstance(prompt, str) else None,
                ids,
                [Completion() for _ in range(sp.n)],
                now,
            )
            names = [rid] if sp.n == 1 else [f"{rid}#{k}" for k in range(sp.n)]
            for k, name in enumerate(names):
                sample_slot[name] = (rid, k)
        remaining = len(sample_slot)
        with tqdm(total=remaining, desc="generate", unit="seq", disable=not use_tqdm) as bar:
            self._collect(results, sample_slot, bar)
        return list(results.values())

    def _collect(self, results, sample_slot, bar) -> None:
        """Step the engine until idle, folding every output into ``results``."""
        eng = self.engine
        while eng.has_unfinished():
            for o in eng.step():
                rid, k = sample_slot[o.request_id]
                res, comp = results[rid], results[rid].outputs[k]
                comp.token_ids.extend(o.new_token_ids)
                if o.logprobs is not None:
                    if comp.logprobs is None:
                        comp.logprobs = []
                    comp.logprobs.extend(o.logprobs)
                if o.prompt_logprobs is not None and res.prompt_logprobs is None:
                    res.prompt_logprobs = o.prompt_logprobs
                t = time.monotonic()
                if res.first_token_time is None and o.new_token_ids:
                    res.first_token_time = t
                if o.finished:
                    comp.finish_reason = o.finish_reason
                    comp.text = self._text(comp.token_ids)
                    res.finish_time = t
                    bar.update(1)
