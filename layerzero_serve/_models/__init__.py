"""Decoder models (Llama 2/3.x, Mistral, Qwen2, Qwen3), their config and checkpoint loader.

The model never touches the KV cache: ``LlamaForCausalLM.forward(input_ids, positions, attn,
meta)`` calls the runtime's ``attn(layer_idx, q, k, v, meta)`` for every layer.
"""

from layerzero_serve._models.config import (
    SUPPORTED_ARCHITECTURES,
    Llama3RopeScaling,
    ModelConfig,
    load_config,
    parse_dtype,
)
from layerzero_serve._models.dummy import DUMMY_PRESETS, build_dummy_model, dummy_config
from layerzero_serve._models.llama import AttentionFn, LlamaForCausalLM
from layerzero_serve._models.loader import checkpoint_files, load_model
from layerzero_serve.errors import ModelPathError

__all__ = [
    "DUMMY_PRESETS",
    "SUPPORTED_ARCHITECTURES",
    "AttentionFn",
    "Llama3RopeScaling",
    "LlamaForCausalLM",
    "ModelConfig",
    "ModelPathError",
    "build_dummy_model",
    "checkpoint_files",
    "dummy_config",
    "load_config",
    "load_model",
    "parse_dtype",
]
