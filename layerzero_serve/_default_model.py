"""The embedded default model: a small Llama-architecture checkpoint in Hugging Face format
(config.json, model.safetensors, tokenizer.json), written once into ``LZ_CACHE_DIR`` from a
fixed seed. Its weights are random, so its text is gibberish; it exists so that ``demo`` and the
examples run anywhere with no download, through the same loader real checkpoints use.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from layerzero_serve import _envs as envs

logger = logging.getLogger("layerzero_serve")

DEFAULT_MODEL_VERSION = "v1"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
BOS_ID, EOS_ID = 1, 2

_CORPUS = """
The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in fixed
size blocks. Continuous batching lets new requests join a running batch at every step. Prefix
caching reuses the blocks of a shared system prompt. Speculative decoding drafts several tokens
and verifies them in one pass. Sampling draws the next token with temperature, top k, top p and
min p. CUDA graphs replay a captured decode step without launching each kernel from the host.
You are a helpful assistant. Answer the question in one sentence. What is the capital of France?
Paris is the capital of France. Write a short poem about the sea. Explain how a compiler works.
Once upon a time there was a small robot who wanted to learn how to paint the stars at night.
""".strip()


def _config(vocab_size: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer)
    return tok


def _weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.08

    w = {
        "model.embed_tokens.weight": rnd(v, h),
        "model.norm.weight": torch.ones(h),
        "lm_head.weight": rnd(v, h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rnd(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, nh * hd)
        w[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        w[p + "mlp.up_proj.weight"] = rnd(inter, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, inter)
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return w


def write_default_model(path: Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Write the default checkpoint into ``path`` (created; must not exist)."""
    from safetensors.torch import save_file

    tok = _train_tokenizer(vocab_size)
    cfg = _config(tok.get_vocab_size())
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(_weights(cfg, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )
    return path


def ensure_default_model(root: Path | None = None) -> Path:
    """Path of the default model, writing it on first use (atomically: a temporary folder
    renamed into place, so concurrent first runs cannot leave a half-written checkpoint)."""
    root = root or envs.cache_dir()
    final = root / f"default-model-{DEFAULT_MODEL_VERSION}"
    if (final / "model.safetensors").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-default-"))
    try:
        write_default_model(tmp / "m")
        try:
            os.replace(tmp / "m", final)
            logger.info("wrote the default model to %s", final)
        except OSError:
            if not (final / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
