"""The checkpoint's tokenizer behind the part of the Hugging Face tokenizer API that serving code
uses: ``encode`` / ``decode`` / ``__call__`` / ``apply_chat_template`` / special tokens.

Built from the checkpoint's text assets (``tokenizer.json``, ``tokenizer_config.json``, the
chat template; or a GGUF file's metadata). Encoding and decoding are the ``tokenizers``
library's, so ids and text equal transformers' fast tokenizer on the same files; chat templates
render with jinja2 in a sandbox, as transformers renders them (``_chat_template``).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from layerzero_serve._chat_template import render_chat
from layerzero_serve._text_assets import TextAssets, load_text_assets
from layerzero_serve.errors import ValidationError
from layerzero_serve.request import check_token_ids

__all__ = ["Tokenizer"]

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")  # the template sees these


def _ids_of(param: str, ids: object) -> list[int]:
    """Token ids as a list of ints (lists, tuples, NumPy arrays and tensors are accepted)."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    return check_token_ids(param, ids)


def _text_of(param: str, text: object) -> str:
    if not isinstance(text, str):
        raise ValidationError(param, type(text).__name__, "a str")
    return text


def _is_batch(conversation: object) -> bool:
    return (
        isinstance(conversation, (list, tuple))
        and bool(conversation)
        and isinstance(conversation[0], (list, tuple))
    )


class Tokenizer:
    """A Hugging Face-compatible tokenizer over a checkpoint's text assets.

    ``llm.tokenizer`` / ``llm.get_tokenizer()`` / ``engine.tokenizer`` give one; or
    ``Tokenizer.from_pretrained(checkpoint_dir)``. What code written against
    ``transformers.PreTrainedTokenizerFast`` calls works the same: ``encode``, ``decode``,
    ``batch_decode``, ``__call__``, ``apply_chat_template``, ``convert_ids_to_tokens``,
    ``convert_tokens_to_ids``, ``get_vocab``, ``len()``, ``vocab_size``, the special tokens
    (``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` and their ``*_id``),
    ``all_special_ids``, ``chat_template`` and ``backend_tokenizer`` (the
    ``tokenizers.Tokenizer``). Differences: ``apply_chat_template(tokenize=True)`` returns the
    list of ids unless ``return_dict=True`` (transformers 5 returns a dict by default); there is
    no padding, truncation or tensor output.

    Invalid inputs raise ``ValidationError`` naming the argument (``text``, ``token_ids``,
    ``conversation``, ``chat_template``).

    CUDA graphs: host only (text processing).
    """

    def __init__(self, assets: TextAssets) -> None:
        if not isinstance(assets, TextAssets):
            raise ValidationError("assets", type(assets).__name__, "a TextAssets")
        self._tok = tok = assets.tokenizer
        self.chat_template: str | None = assets.chat_template
        self.name_or_path = assets.source
        self.generation_config = dict(assets.generation_config)
        self.bos_token = assets.bos_token
        self.eos_token = assets.eos_token
        self.pad_token = assets.pad_token
        self.unk_token = assets.unk_token
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.pad_token_id = self._id_of(self.pad_token)
        self.unk_token_id = self._id_of(self.unk_token)
        self._special_ids = frozenset(assets.special_token_ids)
        # transformers' order (bos, eos, unk, pad), each once
        named = (self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id)
        self.all_special_ids: list[int] = list(dict.fromkeys(i for i in named if i is not None))
        # add_bos_token asks for a BOS that the tokenizer's post-processor may already add
        bos = self.bos_token_id
        adds = bos is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos]
        self._prepend_bos = bool(assets.add_bos_token) and bos is not None and not adds

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of a checkpoint directory (``tokenizer.json`` + ``tokenizer_config.json``)
        or a ``.gguf`` file; ``ValidationError("path", ...)`` when it has none."""
        if not isinstance(path, (str, os.PathLike)):
            raise ValidationError("path", type(path).__name__, "a str or path")
        assets = load_text_assets(Path(path))
        if assets is None:
            raise ValidationError("path", str(path), "a checkpoint with a tokenizer.json")
        return cls(assets)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={len(self)})"

    # ---- vocabulary ------------------------------------------------------------------------
    @property
    def backend_tokenizer(self):
        """The ``tokenizers.Tokenizer`` doing the work."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), as in transformers."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def all_special_tokens(self) -> list[str]:
        return [self._tok.id_to_token(i) for i in self.all_special_ids]

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids ``skip_special_tokens`` leaves out of decoded text."""
        return self._special_ids

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of the ``<0xHH>`` byte tokens when the decoder has byte fallback (SentencePiece
        BPE checkpoints), else empty: the incremental detokenizer holds text while a run of
        them is open. Computed once."""
        if "ByteFallback" not in repr(self._tok.decoder):
            return frozenset()
        vocab = self._tok.get_vocab(with_added_tokens=False)
        return frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t))

    def convert_ids_to_tokens(
        self, ids: int | Sequence[int], skip_special_tokens: bool = False
    ) -> str | list[str]:
        """The token string of an id, or of each id of a sequence."""
        single = isinstance(ids, int) and not isinstance(ids, bool)
        toks = []
        for i in _ids_of("ids", ids):
            if skip_special_tokens and i in self._special_ids:
                continue
            toks.append(self._tok.id_to_token(i))
        return toks[0] if single else toks

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """The id of a token string (None when unknown), or of each of a sequence."""
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(_text_of("tokens", t)) for t in tokens]

    # ---- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_special_tokens``: the post-processor's special tokens
        (and the BOS ``add_bos_token`` asks for), as transformers adds them."""
        ids = self._tok.encode(_text_of("text", text), add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict:
        """``{"input_ids": ids, "attention_mask": [1, ...]}`` for a str, or lists of those
        for a list of str."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if not isinstance(text, Sequence):
            raise ValidationError("text", type(text).__name__, "a str or a list of str")
        batch = [
            self.encode(_text_of(f"text[{i}]", t), add_special_tokens) for i, t in enumerate(text)
        ]
        return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}

    def decode(self, token_ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``token_ids`` (special tokens left out with ``skip_special_tokens``)."""
        if not isinstance(skip_special_tokens, bool):
            raise ValidationError("skip_special_tokens", skip_special_tokens, "a bool")
        ids = _ids_of("token_ids", token_ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    # ---- chat ------------------------------------------------------------------------------
    def render_chat(
        self,
        messages: list[dict],
        param: str = "conversation",
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_kwargs: object,
    ) -> str:
        """The text of one conversation rendered with ``chat_template`` (or the checkpoint's);
        a template that rejects it raises a ValidationError naming ``param``."""
        source = self.chat_template if chat_template is None else chat_template
        if source is None:
            raise ValidationError(
                "chat_template",
                None,
                "a Jinja2 chat template (this checkpoint's tokenizer_config.json has none: pass "
                "chat_template=...)",
            )
        if not isinstance(source, str):
            raise ValidationError("chat_template", type(source).__name__, "None or a str")
        if not isinstance(add_generation_prompt, bool):
            raise ValidationError("add_generation_prompt", add_generation_prompt, "a bool")
        specials = {n: getattr(self, n) for n in _SPECIAL_NAMES if getattr(self, n) is not None}
        explicit = {"tools": tools, "documents": documents}
        explicit["add_generation_prompt"] = add_generation_prompt
        # as in transformers, the caller's variables win over the special tokens' defaults
        return render_chat(source, messages, param, {**specials, **explicit, **template_kwargs})

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping] | Sequence[Sequence[Mapping]],
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
        **template_kwargs: object,
    ):
        """Render a conversation (a list of message dicts) or a batch of them with the chat
        template (``chat_template`` or the checkpoint's), as transformers does: the template
        sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special
        tokens (``bos_token``...) and ``template_kwargs``. Returns the text
        (``tokenize=False``), the ids (encoded without adding special tokens: the template
        writes them), or ``{"input_ids", "attention_mask"}`` with ``return_dict=True``; a
        list of those for a batch. ``ValidationError("chat_template", ...)`` when there is no
        template or it does not compile; ``ValidationError("conversation", ...)`` when it
        rejects the conversation."""
        for name, flag in (("tokenize", tokenize), ("return_dict", return_dict)):
            if not isinstance(flag, bool):
                raise ValidationError(name, flag, "a bool")
        batch = _is_batch(conversation)
        chats = list(conversation) if batch else [conversation]
        if "messages" in template_kwargs or "param" in template_kwargs:
            names = sorted({"messages", "param"} & template_kwargs.keys())
            raise ValidationError(
                "chat_template_kwargs", names, "template variables other than these"
            )
        out = []
        for i, chat in enumerate(chats):
            param = f"conversation[{i}]" if batch else "conversation"
            if isinstance(chat, (str, bytes)) or not isinstance(chat, Sequence):
                raise ValidationError(param, type(chat).__name__, "a list of message dicts")
            for j, m in enumerate(chat):
                if not isinstance(m, Mapping):
                    raise ValidationError(f"{param}[{j}]", type(m).__name__, "a message dict")
            text = self.render_chat(
                [dict(m) for m in chat],
                param,
                chat_template,
                add_generation_prompt,
                tools,
                documents,
                **template_kwargs,
            )
            if not tokenize:
                out.append(text)
                continue
            ids = self.encode(text, add_special_tokens=False)
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)} if return_dict else ids)
        return out if batch else out[0]
