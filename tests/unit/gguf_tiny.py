"""Write tiny GGUF files from tiny random transformers models, the way llama.cpp's
``convert_hf_to_gguf.py`` lays them out (metadata keys, tensor names, the Llama Q/K row
permutation, no ``output.weight`` when embeddings are tied), with ``gguf.GGUFWriter``."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

TINY = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512,
}

_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random float32 transformers model of ``arch`` (llama / qwen2 / qwen3); every
    parameter (norms and biases too) randomised so each one matters."""
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[arch]
    kw = {**TINY, **overrides}
    if arch == "qwen3":
        kw.setdefault("head_dim", 32)
    cfg = getattr(transformers, cls)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".", 3)  # model.layers.{i}.rest
    if parts[:2] == ["model", "layers"] and parts[3] in _NAMES:
        return f"blk.{parts[2]}.{_NAMES[parts[3]]}"
    return None


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's Q/K row order for the ``llama`` architecture: each head's two
    rotate-half halves interleaved."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def byte_level_tokens(n: int) -> list[str]:
    """``n`` distinct strings of the GPT-2 byte alphabet (its 256 symbols, then pairs)."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    pairs = (a + b for a in alphabet for b in alphabet)
    return (alphabet + [next(pairs) for _ in range(max(0, n - 256))])[:n]


def write_gguf(
    path: Path,
    model: torch.nn.Module,
    arch: str = "llama",
    *,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    drop: tuple[str, ...] = (),
    raw_types: dict[str, gguf.GGMLQuantizationType] | None = None,
    metadata: dict[str, object] | None = None,
    architecture: str | None = None,
) -> Path:
    """Write ``model`` as a GGUF file. 2-D weights are stored as ``qtype`` (1-D ones as F32);
    ``drop`` omits GGUF tensors; ``raw_types`` stores the named tensors as raw bytes of
    another type (garbage content, for unsupported-type tests); ``metadata`` overrides keys
    (a value of None removes the key); ``architecture`` overrides ``general.architecture``."""
    cfg = model.config
    arch_name = architecture or arch
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = cfg.rope_parameters if hasattr(cfg, "rope_parameters") else {}
    meta: dict[str, object] = {
        f"{arch_name}.block_count": cfg.num_hidden_layers,
        f"{arch_name}.context_length": cfg.max_position_embeddings,
        f"{arch_name}.embedding_length": cfg.hidden_size,
        f"{arch_name}.feed_forward_length": cfg.intermediate_size,
        f"{arch_name}.attention.head_count": heads,
        f"{arch_name}.attention.head_count_kv": kv_heads,
        f"{arch_name}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch_name}.rope.freq_base": float(rope.get("rope_theta", 10000.0)),
        f"{arch_name}.rope.dimension_count": head_dim,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": byte_level_tokens(cfg.vocab_size),
        "tokenizer.ggml.token_type": [1] * cfg.vocab_size,
        "tokenizer.ggml.merges": [
            f"{t[0]} {t[1]}" for t in byte_level_tokens(cfg.vocab_size)[256:]
        ],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    if head_dim != cfg.hidden_size // heads:
        meta[f"{arch_name}.attention.key_length"] = head_dim
        meta[f"{arch_name}.attention.value_length"] = head_dim
    meta.update(metadata or {})
    writer = gguf.GGUFWriter(str(path), arch_name)
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    tied = cfg.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        out = gguf_name(name)
        if out is None or out in drop or (tied and name == "lm_head.weight"):
            continue
        w = tensor.detach().float()
        if arch == "llama" and ".attn_q." in out:
            w = llama_cpp_permute(w, heads)
        elif arch == "llama" and ".attn_k." in out:
            w = llama_cpp_permute(w, kv_heads)
        data = w.numpy()
        if raw_types and out in raw_types:
            t = raw_types[out]
            block, size = gguf.GGML_QUANT_SIZES[t]
            raw = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(out, raw, raw_dtype=t)
        elif data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(out, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(out, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
