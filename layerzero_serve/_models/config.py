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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
        """Build from the dict of an HF ``config.json`` (either config style)."""
        arch = _architecture(raw)
        kind = SUPPORTED_ARCHITECTURES[arch]
        act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
        if act != "silu":
            raise UnsupportedModelError(f"{arch}: hidden_act {act!r} is not supported (silu only)")
        if raw.get("mlp_bias", False):
            raise UnsupportedModelError(f"{arch}: mlp_bias=true is not supported")
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = raw.get("head_dim") or (128 if kind == "qwen3" else hidden // heads)
        if heads % kv_heads:
            raise UnsupportedModelError(
                f"{arch}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        max_pos = int(raw.get("max_position_embeddings", 2048))
        _check_sliding_window(raw, arch, kind, max_pos)
        theta, scaling = _rope(raw, arch, max_pos)
        if kind == "qwen2":
            qkv_bias, o_bias = True, False
        elif kind == "mistral":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
        eos = raw.get("eos_token_id")
        eos_ids = (
            () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        )
        bos = raw.get("bos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            qk_norm=kind == "qwen3",
            max_position_embeddings=max_pos,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            torch_dtype=_config_dtype(raw),
        )


def load_config(src: str | Path | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """``ModelConfig`` from a checkpoint directory, a ``config.json`` path or a config dict."""
    if isinstance(src, ModelConfig):
        return src
    if isinstance(src, Mapping):
        return ModelConfig.from_hf(src)
    path = Path(src)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def _architecture(raw: Mapping[str, Any]) -> str:
    archs = raw.get("architectures") or []
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


def _check_sliding_window(raw: Mapping[str, Any], arch: str, kind: str, max_pos: int) -> None:
    window = raw.get("sliding_window")
    if window is None or int(window) >= max_pos:
        return
    if kind in ("qwen2", "qwen3"):
        layer_types = raw.get("layer_types")
        if layer_types is not None:
            active = "sliding_attention" in layer_types
        else:
            active = bool(raw.get("use_sliding_window", False)) and int(
                raw.get("max_window_layers", 0)
            ) < int(raw["num_hidden_layers"])
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
    if isinstance(params, Mapping) and params:
        if all(isinstance(v, Mapping) for v in params.values()):  # per layer type
            distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
            if len(distinct) != 1:
                raise UnsupportedModelError(f"{arch}: per-layer-type rope_parameters differ")
            params = next(iter(params.values()))
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling: Mapping[str, Any] | None = params
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling")
    partial = (scaling or {}).get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedModelError(f"{arch}: partial_rotary_factor={partial} is not supported")
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(
            f"{arch}: rope scaling type {rope_type!r} is not supported (default, llama3)"
        )
    try:
        llama3 = Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(
                scaling.get("original_max_position_embeddings") or max_pos
            ),
        )
    except KeyError as e:
        raise UnsupportedModelError(f"{arch}: llama3 rope scaling lacks {e.args[0]!r}") from None
    return float(theta), llama3


def _config_dtype(raw: Mapping[str, Any]) -> torch.dtype | None:
    value = raw.get("dtype", raw.get("torch_dtype"))
    try:
        return parse_dtype(value)
    except UnsupportedModelError:
        return None
