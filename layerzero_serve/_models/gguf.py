"""Load a llama.cpp GGUF checkpoint (Llama, Qwen2, Qwen3 architectures) into
:class:`LlamaForCausalLM`, dequantizing every tensor to the target dtype.

* :func:`gguf_model_config` turns the GGUF metadata (``{arch}.block_count``,
  ``{arch}.attention.head_count``...) into the dict an HF ``config.json`` would hold and reuses
  :meth:`ModelConfig.from_hf`, so GGUF and safetensors checkpoints share one set of checks.
* :func:`load_gguf_model` maps llama.cpp tensor names to this project's (``blk.3.attn_q.weight``
  -> ``model.layers.3.self_attn.q_proj.weight``), dequantizes with ``gguf.quants.dequantize``
  and, for the ``llama`` architecture only, undoes the row permutation llama.cpp's converter
  applies to the Q and K projections (its RoPE pairs adjacent dimensions; HF's and ours rotate
  halves). Qwen2/Qwen3 files are written unpermuted (llama.cpp runs them with NeoX RoPE).
* :func:`gguf_text_assets` (in :mod:`.gguf_tokenizer`) builds the tokenizer and chat template.

Every problem raises a ``ValueError`` subclass naming the file: an unsupported architecture or
quantization type (naming the tensor), a missing tensor (:class:`MissingWeightError`), a tensor
of the wrong shape, a truncated or corrupt file. Names, shapes and quantization types are all
checked before anything is dequantized.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from layerzero_serve._models.config import ModelConfig, parse_dtype
from layerzero_serve._models.gguf_file import GGUFFile, open_gguf
from layerzero_serve._models.gguf_tokenizer import gguf_text_assets
from layerzero_serve._models.layers import rope_inv_freq
from layerzero_serve._models.llama import LlamaForCausalLM, set_parameter
from layerzero_serve._models.loader import PROGRESS_THRESHOLD_BYTES, _resolve_device
from layerzero_serve.errors import MissingWeightError, UnsupportedModelError

__all__ = ["GGUFFile", "gguf_model_config", "gguf_text_assets", "load_gguf_model", "open_gguf"]

#: ``general.architecture`` -> the HF architecture this runtime implements it with.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

#: llama.cpp per-layer tensor names -> this project's (HF) names under ``model.layers.{i}.``.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: Per-frequency RoPE factors llama.cpp stores for Llama 3.1-style scaling (checked, not loaded).
_ROPE_FREQS = "rope_freqs.weight"

#: ``general.file_type`` values whose weights are all in one float dtype (0 = all F32,
#: 1 = mostly F16, 32 = mostly BF16): that dtype is the checkpoint dtype. Quantized files get
#: none (the engine picks its default).
_FILE_TYPE_DTYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}


def hf_name(gguf_name: str) -> str | None:
    """This project's parameter name for a llama.cpp tensor name, None when unknown."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        suffix = _LAYER_TENSORS.get(parts[2])
        if suffix is not None:
            return f"model.layers.{int(parts[1])}.{suffix}"
    return None


# ------------------------------------------------------------------ config


def _architecture(gf: GGUFFile) -> str:
    arch = gf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise gf.error(
            f"general.architecture {arch!r} is not supported; supported GGUF architectures: "
            f"{sorted(GGUF_ARCHITECTURES)}"
        )
    if gf.integer(f"{arch}.expert_count", 0, minimum=0) > 0:
        raise gf.error(f"{arch}: mixture-of-experts models are not supported")
    return arch


def _vocab_size(gf: GGUFFile, arch: str) -> int:
    """From the token list (``{arch}.vocab_size`` when there is none); both must agree with
    the embedding table's rows."""
    tokens = gf.raw("tokenizer.ggml.tokens", None)
    declared = gf.integer(f"{arch}.vocab_size", None)
    vocab = len(tokens) if isinstance(tokens, list) else declared
    if vocab is None:
        raise gf.error("neither tokenizer.ggml.tokens nor {arch}.vocab_size gives the vocab size")
    if declared is not None and declared != vocab:
        raise gf.error(
            f"{arch}.vocab_size={declared} but tokenizer.ggml.tokens has {vocab} entries"
        )
    embd = gf.tensors.get("token_embd.weight")
    if embd is not None and int(embd.shape[-1]) != vocab:
        raise gf.error(f"token_embd.weight has {int(embd.shape[-1])} rows, the vocab {vocab}")
    return vocab


def _rope_scaling(gf: GGUFFile, arch: str) -> dict[str, Any] | None:
    """``rope_scaling`` for the HF dict: none, or Llama 3.1-style scaling recognised from the
    ``rope_freqs.weight`` tensor llama.cpp stores for it. Linear/YaRN scaling (metadata
    ``{arch}.rope.scaling.type``) is not supported."""
    kind = gf.string(f"{arch}.rope.scaling.type", "none")
    if kind != "none":
        raise gf.error(
            f"{arch}.rope.scaling.type={kind!r} is not supported (only unscaled RoPE and "
            "Llama 3.1-style scaling, which GGUF stores as a rope_freqs tensor)"
        )
    tensor = gf.tensors.get(_ROPE_FREQS)
    if tensor is None:
        return None
    factors = _dequantize(gf, tensor).astype(np.float64).reshape(-1)
    # Llama 3.1 / 3.2 scaling always uses these three; the factor is the largest per-frequency
    # factor. Other values are recognised only if the recomputed factors match (checked below).
    return {
        "rope_type": "llama3",
        "factor": float(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def _check_rope_freqs(gf: GGUFFile, config: ModelConfig) -> None:
    """The ``rope_freqs.weight`` factors must be those the inferred llama3 scaling gives."""
    tensor = gf.tensors.get(_ROPE_FREQS)
    if tensor is None:
        return
    factors = torch.from_numpy(_dequantize(gf, tensor).astype(np.float32).reshape(-1))
    plain = rope_inv_freq(_replace(config, rope_scaling=None), "cpu")
    scaled = rope_inv_freq(config, "cpu")
    if factors.shape != plain.shape or not torch.allclose(plain / factors, scaled, rtol=1e-4):
        raise gf.error(
            f"{_ROPE_FREQS} holds RoPE factors that do not match Llama 3.1-style scaling "
            "(low_freq_factor 1, high_freq_factor 4, original context 8192); not supported"
        )


def _replace(config: ModelConfig, **changes: Any) -> ModelConfig:
    from dataclasses import replace

    return replace(config, **changes)


def _hf_config(gf: GGUFFile) -> dict[str, Any]:
    """The metadata as the dict an HF ``config.json`` would hold (values type-checked here,
    naming the GGUF key, before :meth:`ModelConfig.from_hf` checks their consistency)."""
    arch = _architecture(gf)
    heads = gf.integer(f"{arch}.attention.head_count")
    hidden = gf.integer(f"{arch}.embedding_length")
    head_dim = gf.integer(f"{arch}.attention.key_length", None)
    value_dim = gf.integer(f"{arch}.attention.value_length", None)
    if head_dim is None:
        head_dim = hidden // heads
    if value_dim is not None and value_dim != head_dim:
        raise gf.error(f"{arch}: key_length {head_dim} != value_length {value_dim} unsupported")
    rope_dims = gf.integer(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise gf.error(
            f"{arch}.rope.dimension_count={rope_dims} < head_dim {head_dim}: partial rotary "
            "embeddings are not supported"
        )
    vocab = _vocab_size(gf, arch)
    max_pos = gf.integer(f"{arch}.context_length", 2048)
    window = gf.integer(f"{arch}.attention.sliding_window", None, minimum=0)
    if window and window < max_pos:
        raise gf.error(
            f"{arch}.attention.sliding_window={window} < context {max_pos} is not supported"
        )
    raw: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": gf.integer(f"{arch}.feed_forward_length"),
        "num_hidden_layers": gf.integer(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": gf.integer(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": gf.positive_float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": gf.positive_float(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": max_pos,
        # llama.cpp writes no output.weight when the head shares the embedding
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "attention_bias": "blk.0.attn_q.bias" in gf.tensors,
        "bos_token_id": gf.token_id("tokenizer.ggml.bos_token_id", vocab),
        "eos_token_id": gf.token_id("tokenizer.ggml.eos_token_id", vocab),
        "pad_token_id": gf.token_id("tokenizer.ggml.padding_token_id", vocab),
    }
    scaling = _rope_scaling(gf, arch)
    if scaling is not None:
        raw["rope_scaling"] = scaling
    file_type = gf.integer("general.file_type", None, minimum=0)
    if file_type in _FILE_TYPE_DTYPES:
        raw["torch_dtype"] = str(_FILE_TYPE_DTYPES[file_type]).removeprefix("torch.")
    return raw


def gguf_model_config(path: str | os.PathLike | GGUFFile) -> ModelConfig:
    """The :class:`ModelConfig` of a GGUF file (a path, or a file opened with
    :func:`open_gguf`).

    Raises:
        UnsupportedModelError: an architecture other than llama/qwen2/qwen3 (named), a
            missing or invalid metadata key (named), unsupported RoPE scaling or sliding
            window, an unreadable file.
        ModelPathError: ``path`` does not exist.
    """
    gf = open_gguf(path)
    raw = _hf_config(gf)
    try:
        config = ModelConfig.from_hf(raw)
    except UnsupportedModelError as e:
        # from_hf speaks of config.json; here the fields come from the GGUF metadata
        raise gf.error(str(e).replace("config.json", "GGUF metadata")) from None
    _check_rope_freqs(gf, config)
    return config


# ------------------------------------------------------------------ weights


def _dequantize(gf: GGUFFile, tensor: Any) -> np.ndarray:
    """``tensor``'s values as a float32 array in PyTorch dimension order."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise _unsupported_type(gf, tensor) from None
    except Exception as e:  # a block table that does not parse: corrupt data
        raise gf.error(f"tensor {tensor.name} cannot be dequantized ({e})") from None
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    # F32 tensors come back as read-only views of the memory map: copy those
    return values if values.flags.writeable else values.copy()


def _unsupported_type(gf: GGUFFile, tensor: Any) -> UnsupportedModelError:
    return gf.error(
        f"tensor {tensor.name} is stored as {tensor.tensor_type.name}, a format the gguf "
        "package cannot dequantize (or not a float format); re-quantize the model to a "
        "supported type (F32, F16, BF16, Q8_0, Q4_K_M...)"
    )


def _check_types(gf: GGUFFile, names: list[str]) -> None:
    """Refuse, before dequantizing anything, tensors in a type ``gguf.quants`` cannot turn
    into floats (integer tensors, Q8_1, Q8_K...)."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import _type_traits  # the table ``dequantize`` dispatches on

    floats = {T.F32, T.F16}
    for name in names:
        tensor = gf.tensors[name]
        if tensor.tensor_type not in floats and tensor.tensor_type not in _type_traits:
            raise _unsupported_type(gf, tensor)


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order. Its converter reorders each head's ``head_dim`` rows
    from two halves ``[x0..x_{d/2-1}, y0..y_{d/2-1}]`` (rotate-half RoPE) to interleaved pairs
    ``[x0, y0, x1, y1...]``: rows viewed as ``[heads, 2, d/2]`` were swapped to
    ``[heads, d/2, 2]``. ``w`` is ``[heads * d, hidden]`` (weight) or ``[heads * d]`` (bias)."""
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def _plan(gf: GGUFFile, expected: dict[str, torch.nn.Parameter]) -> dict[str, str]:
    """GGUF tensor name -> parameter name for every tensor, checked from the tensor table
    alone: known names, shapes matching the config, nothing missing, dequantizable types."""
    plan: dict[str, str] = {}
    for name, tensor in gf.tensors.items():
        if name == _ROPE_FREQS:
            continue  # folded into the config's rope scaling (checked there)
        target = hf_name(name)
        if target is None or target not in expected:
            raise gf.error(
                f"tensor {name} has no place in a {gf.architecture} model of this config "
                "(unexpected tensor: a different architecture variant?)"
            )
        shape = tuple(int(d) for d in reversed(tensor.shape))
        want = tuple(expected[target].shape)
        if shape != want:
            raise gf.error(f"tensor {name} has shape {shape}; the metadata implies {want}")
        plan[name] = target
    missing = sorted(set(expected) - set(plan.values()))
    if missing:
        raise MissingWeightError(
            f"{gf.path} lacks {len(missing)} tensor(s) the model needs: "
            + ", ".join(missing[:8])
            + (" ..." if len(missing) > 8 else "")
        )
    _check_types(gf, list(plan))
    return plan


def load_gguf_model(
    path: str | os.PathLike | GGUFFile,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    progress: bool | None = None,
) -> LlamaForCausalLM:
    """Load a GGUF file: every tensor dequantized (on the host) to ``dtype`` and moved to
    ``device``.

    Args:
        path: the ``.gguf`` file, or one opened with :func:`open_gguf`.
        dtype: parameter dtype; ``None``/``"auto"`` = the file's float type (F32/F16/BF16
            files), else float32.
        device: target device.
        progress: tqdm bar over tensors; ``None`` = only for files over ~1 GB.

    Raises:
        UnsupportedModelError: see :func:`gguf_model_config`; also an unexpected tensor, one
            of the wrong shape, or one in a type ``gguf.quants.dequantize`` cannot handle
            (naming the tensor and type).
        MissingWeightError: a tensor the model needs is absent.
    """
    gf = open_gguf(path)
    config = gguf_model_config(gf)
    dtype = parse_dtype(dtype) or config.torch_dtype or torch.float32
    device = _resolve_device(device)
    model = LlamaForCausalLM(config, dtype=dtype, device="meta")
    expected = dict(model.named_parameters())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # shares the embedding (re-tied by finalize)
    plan = _plan(gf, expected)
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    permuted = gf.architecture == "llama"
    show = progress if progress is not None else gf.path.stat().st_size > PROGRESS_THRESHOLD_BYTES
    for name, target in tqdm(
        plan.items(), desc=f"loading {gf.path.name}", unit="tensor", disable=not show
    ):
        values = torch.from_numpy(_dequantize(gf, gf.tensors[name]))
        proj = target.split(".")[-2]
        if permuted and proj in heads:
            values = _unpermute(values, heads[proj])
        set_parameter(model, target, values.to(device=device, dtype=dtype).contiguous())
    leftover = model.finalize(device)
    if leftover:  # pragma: no cover - guarded by _plan
        raise MissingWeightError(f"not loaded: {', '.join(leftover)}")
    return model.eval()
