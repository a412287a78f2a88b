"""Model configuration parsed from a Hugging Face ``config.json``.

Both config styles are accepted:

* transformers >= 5 writes ``rope_parameters: {rope_theta, rope_type, factor, ...}`` and ``dtype``;
* older checkpoints (most real ones) have ``rope_theta`` and ``rope_scaling`` at the top level
  and ``torch_dtype``.

Supported architectures: Llama (2, 3, 3.1, 3.2), Mistral, Qwen2 and Qwen3. RoPE scaling:
none/``"default"`` and ``"llama3"``; anything else (linear, dynamic, yarn, longrope, partial
rotary) raises :class:`UnsupportedModelError`. Sliding-window attention is not supported: a
config whose window is active and shorter than ``max_position_embeddings`` is rejected (Mistral
v0.1's ``sliding_window: 4096``, Qwen with ``use_sliding_window: true``); ``sliding_window: null``
or a window at least as long as the context is plain causal attention and is accepted.

Every field is type- and range-checked: a malformed ``config.json`` (invalid JSON, a missing
required field, a string where a number belongs, ``"tie_word_embeddings": "false"``, 4.5 heads,
a non-positive ``rope_theta`` / ``rms_norm_eps`` / llama3 factor...) raises
:class:`UnsupportedModelError` (a ``ValueError``) naming ``config.json`` and the field. So does a
``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (an int or a list) outside
``[0, vocab_size)``, which would otherwise make every request fail later, blamed on the prompt.
A missing path or a directory without ``config.json`` raises ``ModelPathError`` saying which.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerzero_serve._models.paths import check_model_dir
from layerzero_serve.errors import UnsupportedModelError

SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCH_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` / ``"bfloat16"`` / ``"torch.bfloat16"`` / ``"bf16"`` -> torch dtype.

    ``None`` and ``"auto"`` give ``None``; an unknown name raises ``UnsupportedModelError``.
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.").lower()
    if name == "auto":
        return None
    if name not in _DTYPES:
        raise UnsupportedModelError(
            f"dtype {value!r} is not supported; use one of {sorted(_DTYPES)}"
        )
    return _DTYPES[name]


@dataclass(frozen=True, slots=True)
class Llama3RopeScaling:
    """Llama 3.1-style frequency-dependent RoPE scaling (``rope_type: "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything the model needs, normalised across architectures and config styles.

    ``attention_bias`` is the q/k/v projection bias (Qwen2: always; Llama/Qwen3: the config's
    ``attention_bias``); ``o_proj_bias`` the output projection's (Llama/Qwen3 follow
    ``attention_bias``, Qwen2 never has one). ``qk_norm`` is Qwen3's per-head RMSNorm on q and k
    before RoPE. ``eos_token_ids`` is always a tuple (configs may give an int or a list).
    ``torch_dtype`` is the checkpoint's dtype, ``None`` when the config does not say.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    tie_word_embeddings: bool
    attention_bias: bool
    o_proj_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: torch.dtype | None

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_parameters(self) -> int:
        """Parameter count of the model this config describes (tied embeddings counted once)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h
        attn += (q + 2 * kv) * self.attention_bias + h * self.o_proj_bias + 2 * d * self.qk_norm
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h
        return embed * (1 if self.tie_word_embeddings else 2) + self.num_layers * layer + h

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Build from the dict of an HF ``config.json`` (either config style).

        Raises :class:`UnsupportedModelError` naming the field for an unsupported or invalid
        value (wrong JSON type, out of range, missing required field).
        """
        if not isinstance(raw, Mapping):
            raise UnsupportedModelError(
                f"config.json must hold a JSON object, got {type(raw).__name__}"
            )
        arch = _architecture(raw)
        kind = SUPPORTED_ARCHITECTURES[arch]
        act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
        if act != "silu":
            raise UnsupportedModelError(f"{arch}: hidden_act {act!r} is not supported (silu only)")
        if _bool(raw, "mlp_bias"):
            raise UnsupportedModelError(f"{arch}: mlp_bias=true is not supported")
        hidden, heads = _int(raw, "hidden_size"), _int(raw, "num_attention_heads")
        kv_heads = _int(raw, "num_key_value_heads", None) or heads
        head_dim = _int(raw, "head_dim", None)
        if head_dim is None:
            head_dim = 128 if kind == "qwen3" else hidden // heads
            if head_dim < 1:
                raise UnsupportedModelError(
                    f"config.json: hidden_size={hidden} // num_attention_heads={heads} gives "
                    "head_dim 0; set head_dim or fix the sizes"
                )
        if head_dim % 2:
            raise UnsupportedModelError(f"{arch}: odd head_dim={head_dim} is not supported (RoPE)")
        if heads % kv_heads:
            raise UnsupportedModelError(
                f"{arch}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        max_pos = _int(raw, "max_position_embeddings", 2048)
        num_layers = _int(raw, "num_hidden_layers")
        _check_sliding_window(raw, arch, kind, max_pos, num_layers)
        theta, scaling = _rope(raw, arch, max_pos)
        if kind == "qwen2":
            qkv_bias, o_bias = True, False
        elif kind == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = _bool(raw, "attention_bias")
        vocab = _int(raw, "vocab_size")
        bos = _int(raw, "bos_token_id", None, minimum=0)
        eos = _eos_ids(raw)
        _check_token_ids(raw, vocab)
        return cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive_float(raw, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=_bool(raw, "tie_word_embeddings"),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            qk_norm=kind == "qwen3",
            max_position_embeddings=max_pos,
            bos_token_id=bos,
            eos_token_ids=eos,
            torch_dtype=_config_dtype(raw),
        )


def load_config(src: str | Path | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """``ModelConfig`` from a checkpoint directory, a ``config.json`` path or a config dict.

    A missing path or a directory without ``config.json`` raises :class:`ModelPathError` (a
    ``ValueError`` and a ``FileNotFoundError``) saying which; a malformed or unsupported config
    raises :class:`UnsupportedModelError` naming ``config.json`` and the field.
    """
    if isinstance(src, ModelConfig):
        return src
    if isinstance(src, Mapping):
        return ModelConfig.from_hf(src)
    path = Path(src).expanduser()
    if path.is_dir() or not path.exists():
        path = check_model_dir(src) / "config.json"  # ModelPathError saying what is wrong
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UnsupportedModelError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UnsupportedModelError(
            f"{path}: config.json must hold a JSON object, got {type(raw).__name__}"
        )
    return ModelConfig.from_hf(raw)


# ------------------------------------------------------------------ typed field access

_REQUIRED: Any = object()


def _invalid(field: str, value: object, expected: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config.json: {field}={value!r} is invalid; expected {expected}")


def _lookup(raw: Mapping[str, Any], key: str, default: Any, field: str) -> Any:
    if key in raw:
        return raw[key]
    if default is _REQUIRED:
        raise UnsupportedModelError(f"config.json: required field {field!r} is missing")
    return default


def _as_int(value: object, field: str, minimum: int) -> int:
    """A JSON integer (an integral float such as ``4.0`` is accepted; bools and strings not)."""
    ok = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    if not ok or value < minimum:  # type: ignore[operator]
        raise _invalid(field, value, f"an integer >= {minimum}")
    return int(value)  # type: ignore[arg-type]


def _int(
    raw: Mapping[str, Any], key: str, default: Any = _REQUIRED, *, minimum: int = 1, prefix=""
) -> Any:
    """``raw[key]`` as an int >= ``minimum``; a missing key or JSON ``null`` gives ``default``
    (an error when the field is required, i.e. ``default`` is ``_REQUIRED``)."""
    field = prefix + key
    if raw.get(key) is None:
        if default is _REQUIRED:
            raise UnsupportedModelError(f"config.json: required field {field!r} is missing")
        return default
    return _as_int(raw[key], field, minimum)


def _as_float(value: object, field: str) -> float:
    """A finite JSON number > 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type, operator]
        raise _invalid(field, value, "a finite number > 0")
    return float(value)  # type: ignore[arg-type]


def _positive_float(
    raw: Mapping[str, Any], key: str, default: Any = _REQUIRED, *, prefix: str = ""
) -> float:
    return _as_float(_lookup(raw, key, default, prefix + key), prefix + key)


def _bool(raw: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """A JSON ``true``/``false`` (the string ``"false"`` is rejected, not read as true)."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise _invalid(key, value, "true or false")
    return value


def _eos_ids(raw: Mapping[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, (list, tuple)):
        return tuple(_as_int(e, f"eos_token_id[{i}]", 0) for i, e in enumerate(eos))
    return (_as_int(eos, "eos_token_id", 0),)


def _check_token_ids(raw: Mapping[str, Any], vocab_size: int) -> None:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` (each an int, a list of ints or
    null) must be token ids of the vocabulary, ``[0, vocab_size)``: an id outside it would make
    every request fail later, blamed on the prompt."""
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = raw.get(key)
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, tok in items:
            if tok is None and i is None:
                continue
            field = key if i is None else f"{key}[{i}]"
            is_int = (isinstance(tok, int) and not isinstance(tok, bool)) or (
                isinstance(tok, float) and tok.is_integer()
            )
            if not is_int or not 0 <= tok < vocab_size:
                raise _invalid(
                    field, tok, f"a token id in [0, {vocab_size - 1}] (vocab_size={vocab_size})"
                )


def _architecture(raw: Mapping[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
        raise _invalid("architectures", archs, "a list of class names")
    if not isinstance(raw.get("model_type", ""), (str, type(None))):
        raise _invalid("model_type", raw["model_type"], "a string")
    if archs:
        arch = archs[0]
    elif raw.get("model_type") in _ARCH_BY_MODEL_TYPE:
        arch = _ARCH_BY_MODEL_TYPE[raw["model_type"]]
    else:
        arch = raw.get("model_type") or "<none>"
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _check_sliding_window(
    raw: Mapping[str, Any], arch: str, kind: str, max_pos: int, num_layers: int
) -> None:
    window = _int(raw, "sliding_window", None, minimum=0)
    use_sliding = _bool(raw, "use_sliding_window")
    max_window_layers = _int(raw, "max_window_layers", 0, minimum=0)
    layer_types = raw.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, (list, tuple))
        or not all(isinstance(t, str) for t in layer_types)
    ):
        raise _invalid("layer_types", layer_types, "a list of strings")
    if window is None or window >= max_pos:
        return
    if kind in ("qwen2", "qwen3"):
        if layer_types is not None:
            active = "sliding_attention" in layer_types
        else:
            active = use_sliding and max_window_layers < num_layers
    else:
        active = kind == "mistral"
    if active:
        raise UnsupportedModelError(
            f"{arch}: sliding_window={window} < max_position_embeddings={max_pos} is not "
            "supported (only full causal attention); use a config with sliding_window: null"
        )


def _rope(
    raw: Mapping[str, Any], arch: str, max_pos: int
) -> tuple[float, Llama3RopeScaling | None]:
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, Mapping):
        raise _invalid("rope_parameters", params, "an object")
    if params:
        where = "rope_parameters."
        if all(isinstance(v, Mapping) for v in params.values()):  # per layer type
            distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
            if len(distinct) != 1:
                raise UnsupportedModelError(f"{arch}: per-layer-type rope_parameters differ")
            params = next(iter(params.values()))
        if "rope_theta" in params:
            theta = _as_float(params["rope_theta"], "rope_parameters.rope_theta")
        else:
            theta = _positive_float(raw, "rope_theta", 10000.0)
        scaling: Mapping[str, Any] | None = params
    else:
        where = "rope_scaling."
        theta = _positive_float(raw, "rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, Mapping):
            raise _invalid("rope_scaling", scaling, "an object or null")
    if scaling and "partial_rotary_factor" in scaling:
        partial, partial_field = scaling["partial_rotary_factor"], where + "partial_rotary_factor"
    else:
        partial, partial_field = raw.get("partial_rotary_factor"), "partial_rotary_factor"
    if partial is not None and _as_float(partial, partial_field) != 1.0:
        raise UnsupportedModelError(f"{arch}: partial_rotary_factor={partial} is not supported")
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"{arch}: rope scaling type {rope_type!r} is not supported (default, llama3)"
        )
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in scaling:
            raise UnsupportedModelError(f"{arch}: llama3 rope scaling lacks {key!r}")
    llama3 = Llama3RopeScaling(
        factor=_positive_float(scaling, "factor", prefix=where),
        low_freq_factor=_positive_float(scaling, "low_freq_factor", prefix=where),
        high_freq_factor=_positive_float(scaling, "high_freq_factor", prefix=where),
        original_max_position_embeddings=_int(
            scaling, "original_max_position_embeddings", max_pos, prefix=where
        ),
    )
    if llama3.high_freq_factor == llama3.low_freq_factor:
        raise UnsupportedModelError(
            f"config.json: {where}high_freq_factor must differ from {where}low_freq_factor "
            f"(both {llama3.low_freq_factor}; RoPE divides by their difference)"
        )
    return theta, llama3


def _config_dtype(raw: Mapping[str, Any]) -> torch.dtype | None:
    value = raw.get("dtype", raw.get("torch_dtype"))
    try:
        return parse_dtype(value)
    except UnsupportedModelError:
        return None
