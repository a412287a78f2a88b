"""What a checkpoint says about text: its tokenizer, chat template, special tokens and generation
defaults, read once at load time from a Hugging Face directory (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``) or from a GGUF
file's metadata (``layerzero_serve._models.gguf``).

The engine and ``LLM`` build the user-facing tokenizer, the chat formatting and the default
sampling parameters from a :class:`TextAssets`; nothing else reads these files.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerzero_serve.errors import UnsupportedModelError

logger = logging.getLogger("layerzero_serve")

__all__ = ["TextAssets", "load_text_assets"]


@dataclass(slots=True)
class TextAssets:
    """A checkpoint's text side.

    Attributes:
        tokenizer: the fast tokenizer (a ``tokenizers.Tokenizer``).
        chat_template: the Jinja2 chat template source, or None when the checkpoint has none.
        bos_token, eos_token, pad_token, unk_token: special token strings (None when absent).
        add_bos_token: whether encoding a prompt prepends ``bos_token`` (when the tokenizer's
            own post-processor does not already).
        special_token_ids: ids ``skip_special_tokens`` drops (every special / added-special
            token of the tokenizer).
        generation_config: the checkpoint's generation defaults as a dict in
            ``generation_config.json``'s keys (``eos_token_id`` an int or list, ``temperature``,
            ``top_p``, ``top_k``, ...); empty when there are none.
        source: the file(s) this came from, for messages.
    """

    tokenizer: Any
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool = False
    special_token_ids: frozenset[int] = frozenset()
    generation_config: dict = field(default_factory=dict)
    source: str = ""


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise UnsupportedModelError(f"{file}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _token_text(value: object) -> str | None:
    """A special token in ``tokenizer_config.json`` is a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template(cfg: dict, directory: Path) -> str | None:
    """``chat_template`` of ``tokenizer_config.json`` (a string, or a list of named templates:
    the ``default`` one), else a ``chat_template.jinja`` file beside it."""
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tpl, str) and tpl:
        return tpl
    file = directory / "chat_template.jinja"
    return file.read_text(encoding="utf-8") if file.is_file() else None


def special_ids(tokenizer) -> frozenset[int]:
    """Ids of every special added token of a ``tokenizers.Tokenizer``."""
    decoder = tokenizer.get_added_tokens_decoder()
    return frozenset(i for i, tok in decoder.items() if getattr(tok, "special", False))


def _from_directory(directory: Path) -> TextAssets | None:
    file = directory / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises bare Exception for malformed files
        raise UnsupportedModelError(f"{file}: not a valid tokenizer.json ({e})") from None
    cfg = _read_json(directory / "tokenizer_config.json")
    stm = _read_json(directory / "special_tokens_map.json")

    def special(name: str) -> str | None:
        return _token_text(cfg.get(name)) or _token_text(stm.get(name))

    return TextAssets(
        tokenizer=tok,
        chat_template=_chat_template(cfg, directory),
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        add_bos_token=bool(cfg.get("add_bos_token", False)),
        special_token_ids=special_ids(tok),
        generation_config=_read_json(directory / "generation_config.json"),
        source=str(directory),
    )


def load_text_assets(path: Path | None) -> TextAssets | None:
    """The text assets of a checkpoint directory or a ``.gguf`` file; None when it has no
    tokenizer (dummy models, weights-only directories). Malformed files raise
    ``UnsupportedModelError`` naming the file."""
    if path is None:
        return None
    path = Path(path)
    if path.suffix == ".gguf":
        from layerzero_serve._models.gguf import gguf_text_assets

        return gguf_text_assets(path)
    return _from_directory(path)
