"""The text side of a GGUF file: a ``tokenizers.Tokenizer`` rebuilt from the ``tokenizer.ggml.*``
metadata, the chat template, special tokens and generation defaults, as a :class:`TextAssets`.

Two vocabulary kinds (``tokenizer.ggml.model``):

* ``gpt2``: byte-level BPE (Llama 3, Qwen2/3, SmolLM...). Tokens and merges are stored in the
  byte-to-unicode alphabet, so they go into a ``BPE`` model as they are. How text is split
  before BPE depends on ``tokenizer.ggml.pre``: the same regexes llama.cpp applies for that name
  (e.g. ``smollm``/``starcoder``: every digit alone, then GPT-2's split; ``llama-bpe``: Llama 3's
  split with whole-word vocabulary hits taking precedence over merges).
* ``llama``: SentencePiece BPE (Llama 2, Mistral): ``▁`` for spaces, byte fallback for unknown
  characters; merges are rebuilt from the token scores when the file has none (a merge's rank is
  its result's score, as SentencePiece merges the best-scoring pair first).

Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
tokens, so ``<|im_start|>`` stays whole. When ``tokenizer.ggml.add_bos_token`` is true, the
tokenizer's post-processor prepends BOS (as an HF ``tokenizer.json`` for such a model does).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from layerzero_serve._models.gguf_file import GGUFFile, open_gguf
from layerzero_serve._text_assets import TextAssets

logger = logging.getLogger("layerzero_serve")

__all__ = ["PRE_TOKENIZERS", "build_tokenizer", "gguf_text_assets"]

#: llama.cpp token types (``gguf.TokenType``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS = r"\p{N}"

#: ``tokenizer.ggml.pre`` -> (regexes applied in turn, ignore_merges), as llama.cpp's
#: ``llama-vocab.cpp`` defines them. ``ignore_merges``: a pre-token that is a whole vocabulary
#: entry is taken as is (llama.cpp does this for its Llama 3 type only).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "mpt", "olmo", "jais"), ((_GPT2,), False)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
        ((_DIGITS, _GPT2), False),
    ),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), ((_LLAMA3,), True)),
    **dict.fromkeys(("smaug-bpe", "dbrx"), ((_LLAMA3,), False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), ((_QWEN2,), False)),
}


def _byte_level_pre_tokenizer(pre: str | None, gf: GGUFFile) -> tuple[Any, bool]:
    from tokenizers import Regex, pre_tokenizers

    if pre is None:
        logger.warning("%s: no tokenizer.ggml.pre; splitting text like GPT-2", gf.path)
        pre = "default"
    if pre not in PRE_TOKENIZERS:
        raise gf.error(
            f"tokenizer.ggml.pre={pre!r} is not a supported pre-tokenizer; supported: "
            f"{sorted(PRE_TOKENIZERS)}"
        )
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    if regexes == (_GPT2,):  # the ByteLevel pre-tokenizer's own regex
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    elif regexes == (_DIGITS, _GPT2):
        steps = [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    else:
        steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps), ignore_merges


def _vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id; a string stored twice keeps its first id (llama.cpp looks text up the
    same way)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    return vocab


def _byte_level(gf: GGUFFile, tokens: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models

    merges = gf.string_list("tokenizer.ggml.merges")
    pairs = []
    for i, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise gf.error(f"tokenizer.ggml.merges[{i}]={merge!r} is not 'left right'")
        pairs.append((left, right))
    pre, ignore_merges = _byte_level_pre_tokenizer(gf.string("tokenizer.ggml.pre", None), gf)
    tok = Tokenizer(models.BPE(_vocab(tokens), pairs, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split ``(a, b)`` of a normal
    token into two vocabulary entries, ranked by the token's score (best first; ties by the
    token's id, then by the left part's length, longer first)."""
    vocab = _vocab(tokens)
    ranked = []
    for i, tok in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece(gf: GGUFFile, tokens: list[str], types: list[int]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    n = len(tokens)
    if gf.has("tokenizer.ggml.merges"):
        pairs = [tuple(m.split(" ", 1)) for m in gf.string_list("tokenizer.ggml.merges")]
    else:
        scores = gf.number_list("tokenizer.ggml.scores")
        if len(scores) != n:
            raise gf.error(f"tokenizer.ggml.scores has {len(scores)} entries, tokens {n}")
        pairs = spm_merges(tokens, [float(s) for s in scores], types)
    unk_id = gf.token_id("tokenizer.ggml.unknown_token_id", n)
    unk = tokens[unk_id] if unk_id is not None else None
    model = models.BPE(_vocab(tokens), pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    steps = [normalizers.Replace(" ", "\u2581")]
    if gf.boolean("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if len(steps) == 2 else []),
        ]
    )
    return tok


def build_tokenizer(path: str | os.PathLike | GGUFFile) -> Any:
    """The ``tokenizers.Tokenizer`` a GGUF file describes (no BOS post-processing; see
    :func:`gguf_text_assets`). Raises :class:`UnsupportedModelError` naming the file and key
    for an unsupported ``tokenizer.ggml.model`` / ``tokenizer.ggml.pre`` or malformed
    vocabulary metadata."""
    from tokenizers import AddedToken

    gf = open_gguf(path)
    tokens = gf.string_list("tokenizer.ggml.tokens")
    if not tokens:
        raise gf.error("tokenizer.ggml.tokens is empty")
    types = [int(t) for t in gf.number_list("tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    if len(types) != len(tokens):
        raise gf.error(
            f"tokenizer.ggml.token_type has {len(types)} entries, tokenizer.ggml.tokens "
            f"{len(tokens)}"
        )
    kind = gf.string("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level(gf, tokens)
    elif kind == "llama":
        tok = _sentencepiece(gf, tokens, types)
    else:
        raise gf.error(
            f"tokenizer.ggml.model={kind!r} is not supported (gpt2 byte-level BPE or llama "
            "SentencePiece BPE)"
        )
    special = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
    user = [i for i, t in enumerate(types) if t == USER_DEFINED]
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    return tok


def _eos_ids(gf: GGUFFile, n: int) -> list[int]:
    """End-of-sequence ids: EOS, then end-of-turn / end-of-message tokens when they differ."""
    ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = gf.token_id(f"tokenizer.ggml.{key}", n)
        if value is not None and value not in ids:
            ids.append(value)
    return ids


#: ``general.sampling.*`` keys (recent GGUFs) -> ``generation_config.json`` keys.
_SAMPLING = {"temp": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p"}


def _generation_config(gf: GGUFFile, n: int, eos_ids: list[int]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    bos = gf.token_id("tokenizer.ggml.bos_token_id", n)
    pad = gf.token_id("tokenizer.ggml.padding_token_id", n)
    if bos is not None:
        cfg["bos_token_id"] = bos
    if eos_ids:
        cfg["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if pad is not None:
        cfg["pad_token_id"] = pad
    for key, name in _SAMPLING.items():
        full = f"general.sampling.{key}"
        if gf.has(full):  # defaults only: a value the sampler cannot use is left out
            value = gf.raw(full)
            number = isinstance(value, (int, float, np.integer, np.floating))
            if number and not isinstance(value, (bool, np.bool_)) and np.isfinite(value):
                cfg[name] = int(value) if key == "top_k" else float(value)
            else:
                logger.warning("%s: ignoring metadata %s=%r (not a number)", gf.path, full, value)
    return cfg


def gguf_text_assets(path: str | os.PathLike | GGUFFile) -> TextAssets:
    """Tokenizer, chat template (``tokenizer.chat_template``), special tokens and generation
    defaults (BOS/EOS/pad ids; EOT/EOM ids join ``eos_token_id``) of a GGUF file.

    Raises:
        UnsupportedModelError: unsupported or malformed tokenizer metadata (names the file
            and key), an unreadable file.
        ModelPathError: ``path`` does not exist.
    """
    from tokenizers import processors

    gf = open_gguf(path)
    tok = build_tokenizer(gf)
    tokens = gf.string_list("tokenizer.ggml.tokens")
    n = len(tokens)

    def token(key: str) -> str | None:
        i = gf.token_id(f"tokenizer.ggml.{key}", n)
        return None if i is None else tokens[i]

    bos = token("bos_token_id")
    add_bos = gf.boolean(
        "tokenizer.ggml.add_bos_token", gf.string("tokenizer.ggml.model") == "llama"
    )
    steps = []
    if gf.string("tokenizer.ggml.model") == "gpt2":
        steps.append(processors.ByteLevel(trim_offsets=False))  # offsets only
    if add_bos:
        if bos is None:
            raise gf.error("tokenizer.ggml.add_bos_token is true but there is no bos_token_id")
        bos_id = gf.token_id("tokenizer.ggml.bos_token_id", n)
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, bos_id)],
            )
        )
    if steps:
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
    types = gf.number_list("tokenizer.ggml.token_type", [])
    special_ids = frozenset(i for i, t in enumerate(types) if int(t) in (CONTROL, UNKNOWN))
    return TextAssets(
        tokenizer=tok,
        chat_template=gf.string("tokenizer.chat_template", None) or None,
        bos_token=bos,
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        add_bos_token=add_bos,
        special_token_ids=special_ids,
        generation_config=_generation_config(gf, n, _eos_ids(gf, n)),
        source=str(gf.path),
    )
