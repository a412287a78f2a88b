"""Offline generation: ``LLM(model).generate(prompts, SamplingParams(...))`` and
``LLM(model).chat(messages)``, shaped like vLLM's offline API."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from layerzero_serve._chat_template import check_conversation
from layerzero_serve._prompts import PROMPT_ALLOWED, is_single_prompt, parse_prompt
from layerzero_serve.engine import Engine
from layerzero_serve.errors import ValidationError
from layerzero_serve.outputs import Completion, CompletionOutput, GenerationResult
from layerzero_serve.sampling import SamplingParams, token_ids_in_vocab
from layerzero_serve.tokenizer import Tokenizer

__all__ = ["LLM", "Completion", "CompletionOutput", "GenerationResult"]

logger = logging.getLogger("layerzero_serve")

Prompt = str | Sequence[int] | Mapping[str, object]


class LLM:
    """Offline batch generation over an Engine. ``LLM()`` uses the embedded default model.

    Args:
        model: checkpoint directory, ``dummy:<preset>`` or ``"default"``.
        **config: any EngineConfig field (``dtype``, ``device``, ``max_num_seqs``...).

    ``tokenizer`` / ``get_tokenizer()``: the checkpoint's ``Tokenizer`` (Hugging Face
    compatible), None for a model without one (dummy weights).

    CUDA graphs: a host loop over ``Engine``; never call it inside a capture.
    """

    def __init__(self, model: str | Path = "default", **config: object) -> None:
        if not isinstance(model, (str, os.PathLike)):
            allowed = (
                "a checkpoint directory or .gguf file (str or path), 'dummy:<preset>' or 'default'"
            )
            raise ValidationError("model", model, allowed)
        if "config" in config:  # Engine's own parameter: not an EngineConfig field
            raise ValidationError("config", config["config"], "EngineConfig fields as keywords")
        self.engine = Engine(model, **config)

    def close(self) -> None:
        """Close the engine (ends tensor-parallel workers); also ``with LLM(...) as llm``."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer | None:
        """The checkpoint's tokenizer (as vLLM's ``LLM.get_tokenizer``)."""
        return self.engine.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as a prompt is encoded (special tokens such as a BOS added);
        ValidationError naming ``text`` for a non-str, or when the model has no tokenizer."""
        if not isinstance(text, str):
            raise ValidationError("text", type(text).__name__, "a str")
        return parse_prompt(text, self.tokenizer, "text")[1]

    def decode(self, token_ids: Sequence[int]) -> str | None:
        """The text of ``token_ids`` without special tokens (ints in ``[0, vocab_size)``, a
        list, tuple or 1-D array; ValidationError naming ``token_ids`` otherwise); None
        without a tokenizer."""
        ids = token_ids_in_vocab("token_ids", token_ids, self.engine.vocab_size)
        return None if self.tokenizer is None else self.tokenizer.decode(ids, True)

    # ---- generate ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[GenerationResult]:
        """Generate for every prompt; results in prompt order. A prompt is a str, a list of
        token ids, ``{"prompt": str}`` or ``{"prompt_token_ids": ids}``; ``prompts`` is one
        of those or a list of them. ``sampling_params``: one for all, one per prompt, or None
        (the model's ``generation_config.json`` defaults, else ``SamplingParams()``).

        A bad prompt or parameter raises before any request is queued. The engine must be idle:
        requests added through ``llm.engine`` directly are driven by their caller. If anything
        raises part way (or the call is interrupted), every request of this call is aborted
        and reported before the exception propagates: the engine is left idle.
        """
        self._check_call(use_tqdm)
        if is_single_prompt(prompts):
            items = [prompts]
        elif isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise ValidationError("prompts", type(prompts).__name__, f"{PROMPT_ALLOWED}, or a list")
        else:
            items = list(prompts)
        params = self._params_for(sampling_params, len(items))
        parsed = [parse_prompt(p, self.tokenizer, f"prompts[{i}]") for i, p in enumerate(items)]
        return self._generate(parsed, params, use_tqdm)

    def chat(
        self,
        messages: Sequence[Mapping] | Sequence[Sequence[Mapping]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, object] | None = None,
        tools: list[dict] | None = None,
    ) -> list[GenerationResult]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` dicts) or a
        batch of them, through one ``generate``. Each is rendered with ``chat_template`` (or
        the model's) and ``add_generation_prompt``, ``tools`` and ``chat_template_kwargs``
        as template variables, then encoded without adding special tokens (the template
        writes them). A ValidationError names the field at fault: ``model`` (no tokenizer),
        ``chat_template`` (none, or it does not compile), ``messages[1].role`` (roles:
        system, developer, user, assistant, tool, ipython, function), ``messages[1].content``, or
        ``messages`` (the template raised: it rejects the conversation); in a batch,
        ``messages[i]...``."""
        self._check_call(use_tqdm)
        tok = self.tokenizer
        if tok is None:
            raise ValidationError("model", self.engine.config.model, "a model with a tokenizer")
        if not isinstance(chat_template_kwargs, (Mapping, type(None))):
            raise ValidationError("chat_template_kwargs", chat_template_kwargs, "None or a dict")
        kwargs = dict(chat_template_kwargs or {})
        if not all(isinstance(k, str) for k in kwargs):
            raise ValidationError("chat_template_kwargs", list(kwargs), "a dict with str keys")
        if {"messages", "param"} & kwargs.keys():
            names = sorted({"messages", "param"} & kwargs.keys())
            raise ValidationError("chat_template_kwargs", names, "template variables but these")
        # a template variable given here wins over the argument of the same name
        add_generation_prompt = kwargs.pop("add_generation_prompt", add_generation_prompt)
        tools = kwargs.pop("tools", tools)
        chat_template = kwargs.pop("chat_template", chat_template)
        batch = (
            isinstance(messages, Sequence)
            and not isinstance(messages, str)
            and bool(messages)
            and isinstance(messages[0], Sequence)
            and not isinstance(messages[0], (str, Mapping))
        )
        convs = list(messages) if batch else [messages]
        params = self._params_for(sampling_params, len(convs))
        parsed = []
        for i, conv in enumerate(convs):
            param = f"messages[{i}]" if batch else "messages"
            checked = check_conversation(conv, param)
            text = tok.render_chat(
                checked,
                param,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                **kwargs,
            )
            parsed.append((text, tok.encode(text, add_special_tokens=False)))
        return self._generate(parsed, params, use_tqdm)

    def _check_call(self, use_tqdm: object) -> None:
        if not isinstance(use_tqdm, bool):
            raise ValidationError("use_tqdm", use_tqdm, "a bool")
        if self.engine.has_unfinished():
            pending = len(self.engine.scheduler.requests)
            raise ValidationError(
                "engine",
                f"{pending} unfinished requests added through llm.engine",
                "an idle engine (finish or abort them first)",
            )

    def _params_for(self, sampling_params, num: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.engine.default_sampling_params] * num
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num
        if isinstance(sampling_params, (str, bytes)) or not isinstance(sampling_params, Sequence):
            raise ValidationError(
                "sampling_params", type(sampling_params).__name__, "a SamplingParams or a list"
            )
        params = list(sampling_params)
        for i, sp in enumerate(params):
            if not isinstance(sp, SamplingParams):
                raise ValidationError(
                    f"sampling_params[{i}]", type(sp).__name__, "a SamplingParams"
                )
        if len(params) != num:
            raise ValidationError(
                "sampling_params",
                f"{len(params)} items",
                f"one SamplingParams or {num} (one per prompt)",
            )
        return params

    def _generate(self, parsed, params, use_tqdm: bool) -> list[GenerationResult]:
        """Validate every (text, ids) prompt and its params, then run them all."""
        encoded = []
        for i, (_, ids) in enumerate(parsed):  # validate all before queueing any
            try:
                encoded.append(self.engine._validate_prompt(ids))
                self.engine._validate_params(params[i])
            except ValidationError as e:
                raise type(e)(f"prompts[{i}]: {e.param}", e.value, e.allowed) from None
        texts = [text for text, _ in parsed]
        results: dict[str, GenerationResult] = {}
        try:
            return self._drive(texts, encoded, params, use_tqdm, results)
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

    def _drive(self, texts, encoded, params, use_tqdm, results) -> list[GenerationResult]:
        eng = self.engine
        sample_slot: dict[str, tuple[GenerationResult, int]] = {}
        now = time.monotonic()
        for text, ids, sp in zip(texts, encoded, params, strict=True):
            rid = eng.add_request(ids, sp)
            res = GenerationResult(rid, text, ids, [Completion(k) for k in range(sp.n)], now)
            results[rid] = res
            names = [rid] if sp.n == 1 else [f"{rid}#{k}" for k in range(sp.n)]
            for k, name in enumerate(names):
                sample_slot[name] = (res, k)
        total = len(sample_slot)
        with tqdm(total=total, desc="generate", unit="seq", disable=not use_tqdm) as bar:
            while eng.has_unfinished():
                for o in eng.step():
                    res, k = sample_slot[o.request_id]
                    res.outputs[k].add(o)
                    if o.prompt_logprobs is not None and res.prompt_logprobs is None:
                        res.prompt_logprobs = o.prompt_logprobs
                    t = time.monotonic()
                    if res.first_token_time is None and o.new_token_ids:
                        res.first_token_time = t
                    if o.finished:
                        res.finish_time = t
                        res.finished = all(c.finished() for c in res.outputs)
                        bar.update(1)
        return list(results.values())
