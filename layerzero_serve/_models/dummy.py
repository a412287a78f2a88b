"""Models with seeded random weights and real architectures' shapes, for benchmarks and tests
without checkpoints.

Weights are generated parameter by parameter directly on the target device, in the target dtype,
with a ``torch.Generator`` on that device: no host copy, no float32 staging, so the 8B preset
needs exactly its bf16 footprint (~16 GB) and builds in well under a second on a GPU.

Memory of the weights (parameters x bytes per element; on a CPU the dtype defaults to float32):

================== ========== ================ ================
preset             parameters bf16/fp16 (GPU)  float32 (CPU)
================== ========== ================ ================
dummy:llama3-8b    8.03 B     15.0 GiB         29.9 GiB
dummy:llama3.2-1b  1.24 B     2.3 GiB          4.6 GiB
dummy:small-d128   6.8 M      13 MiB           26 MiB
dummy:tiny         0.14 M     0.3 MiB          0.5 MiB
================== ========== ================ ================

``load_model_source`` refuses a preset whose weights exceed the memory available on the device
before anything is allocated (``InsufficientMemoryError``).
"""

from __future__ import annotations

from typing import Any

import torch

from layerzero_serve._models.config import ModelConfig, load_config, parse_dtype
from layerzero_serve._models.llama import LlamaForCausalLM, set_parameter
from layerzero_serve.errors import ValidationError

_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16",
}

#: HF-style config dicts of the dummy presets (``load_config(DUMMY_PRESETS[name])`` works).
DUMMY_PRESETS: dict[str, dict[str, Any]] = {
    # Llama 3.1 8B shapes.
    "dummy:llama3-8b": {
        **_LLAMA3,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # Llama 3.2 1B shapes.
    "dummy:llama3.2-1b": {
        **_LLAMA3,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    "dummy:tiny": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
    # Small but with head_dim 128 (the head size GPU kernels are prebuilt for): GPU tests.
    "dummy:small-d128": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 2048,
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
}


def dummy_config(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name``; unknown names raise ``ValidationError``."""
    if name not in DUMMY_PRESETS:
        raise ValidationError("model", name, " | ".join(sorted(DUMMY_PRESETS)), "unknown preset")
    return load_config(DUMMY_PRESETS[name])


def build_dummy_model(
    name: str,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LlamaForCausalLM:
    """Preset ``name`` with weights ~ N(0, 0.02) (norm weights 1, biases 0), reproducible for
    a given (seed, device, dtype). ``dtype=None`` = the preset's dtype (bf16 for the Llama
    presets, float32 for ``dummy:tiny``)."""
    config = dummy_config(name)
    dtype = parse_dtype(dtype) or config.torch_dtype or torch.float32
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = LlamaForCausalLM(config, dtype=dtype, device="meta")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for pname, p in list(model.named_parameters()):
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if pname.endswith("norm.weight"):
            t.fill_(1.0)
        elif pname.endswith(".bias"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02, generator=gen)
        set_parameter(model, pname, t)
    model.finalize(device)
    return model.eval()
