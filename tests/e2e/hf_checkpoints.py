"""Tiny random Hugging Face checkpoints of every covered architecture, written with
``save_pretrained`` (fp32): the oracle side of the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_SMALL = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
}
# original_max_position_embeddings is shrunk so that the scaling bends most frequencies and
# matters at the short positions tested here (with 8192 it only touches the slowest ones).
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# name -> (transformers config class, kwargs, save_pretrained kwargs)
CASES = {
    "llama-mha-untied-bias": (
        "LlamaConfig",
        {**_SMALL, "num_key_value_heads": 4, "attention_bias": True, "tie_word_embeddings": False},
        {},
    ),
    "llama-gqa-tied": ("LlamaConfig", {**_SMALL, "tie_word_embeddings": True}, {}),
    "llama3-rope-scaling": (
        "LlamaConfig",
        {
            **_SMALL,
            "hidden_size": 128,
            "head_dim": 32,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": _LLAMA3_ROPE,
        },
        {},
    ),
    "mistral": ("MistralConfig", {**_SMALL, "sliding_window": None}, {}),
    "qwen2-bias": ("Qwen2Config", {**_SMALL, "tie_word_embeddings": True}, {}),
    "qwen3-qknorm": ("Qwen3Config", {**_SMALL, "head_dim": 32}, {}),
    "llama-sharded": ("LlamaConfig", dict(_SMALL), {"max_shard_size": "40KB"}),
}


def randomize(model: torch.nn.Module) -> None:
    """HF's init zeroes biases and sets norms to 1; perturb everything so every path matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))


def make_checkpoint(name: str, path: Path):
    """Write checkpoint ``name`` of CASES into ``path``; returns (path, hf model, hf config)."""
    cls_name, kwargs, save_kwargs = CASES[name]
    torch.manual_seed(sum(map(ord, name)))
    cfg = getattr(transformers, cls_name)(**kwargs)
    hf = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    )
    randomize(hf)
    hf.tie_weights()
    hf.eval()
    hf.save_pretrained(path, **save_kwargs)
    if save_kwargs:
        assert (path / "model.safetensors.index.json").is_file()
    return path, hf, cfg
