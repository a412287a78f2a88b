"""Config parsing, checkpoint loading and dummy presets of ``layerzero_serve._models``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerzero_serve._models import (
    DUMMY_PRESETS,
    LlamaForCausalLM,
    ModelConfig,
    build_dummy_model,
    load_config,
    load_model,
)
from layerzero_serve._models.layers import rope_inv_freq
from layerzero_serve.errors import MissingWeightError, UnsupportedModelError, ValidationError

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matmuls: intra-op threads only add overhead (and thrash on a loaded CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# config.json of Llama 3.1 8B as published (old style: top-level rope_theta / rope_scaling).
LLAMA31_OLD_STYLE = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {**_LLAMA31_ROPE, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def _new_style(old: dict) -> dict:
    """The same config as transformers 5 writes it."""
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    new["rope_parameters"] = {
        **(old.get("rope_scaling") or {"rope_type": "default"}),
        "rope_theta": old["rope_theta"],
    }
    new["dtype"] = old["torch_dtype"]
    return new


def _tiny_hf(tmp_path, tie=False, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        **kw,
    )
    hf = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.tie_weights()
    hf.to(dtype).save_pretrained(tmp_path)
    return hf.eval()


def _dense_attn(layer, q, k, v, meta):
    """One contiguous sequence per forward, causal, ignores paging."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    t = q.shape[0]
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum(
        "hqk,khd->qhd", torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), v
    )


def _logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        h = model(torch.tensor(ids), torch.arange(len(ids)), _dense_attn, None)
        return model.compute_logits(h)


# ---------------------------------------------------------------- config


def test_old_and_new_config_styles_parse_identically():
    old = load_config(LLAMA31_OLD_STYLE)
    assert load_config(_new_style(LLAMA31_OLD_STYLE)) == old
    assert old.architecture == "LlamaForCausalLM"
    assert (old.num_layers, old.num_heads, old.num_kv_heads, old.head_dim) == (32, 32, 8, 128)
    assert old.rope_theta == 500000.0 and old.rope_scaling.factor == 8.0
    assert old.rope_scaling.original_max_position_embeddings == 8192
    assert old.eos_token_ids == (128001, 128008, 128009) and old.bos_token_id == 128000
    assert old.torch_dtype == torch.bfloat16 and not old.tie_word_embeddings
    assert not (old.attention_bias or old.o_proj_bias or old.qk_norm)
    plain = {**LLAMA31_OLD_STYLE, "rope_scaling": None, "eos_token_id": 2}
    assert load_config(_new_style(plain)) == load_config(plain)
    assert load_config(plain).rope_scaling is None and load_config(plain).eos_token_ids == (2,)


@pytest.mark.parametrize("cls", ["LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config"])
def test_transformers_written_config_matches_old_style(cls, tmp_path):
    kw = {"sliding_window": None} if cls == "MistralConfig" else {}
    cfg = getattr(transformers, cls)(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, **kw
    )
    cfg.save_pretrained(tmp_path)
    new = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in new
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    old["rope_theta"] = new["rope_parameters"]["rope_theta"]
    assert load_config(tmp_path) == load_config(old)
    assert load_config(tmp_path).rope_theta == 1e6


def test_file_and_directory_paths(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_OLD_STYLE))
    assert load_config(tmp_path) == load_config(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope")


def test_architecture_specifics():
    base = {k: v for k, v in LLAMA31_OLD_STYLE.items() if k != "rope_scaling"}
    qwen2 = load_config({**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 131072})
    assert qwen2.attention_bias and not qwen2.o_proj_bias and not qwen2.qk_norm
    qwen3 = load_config({**base, "architectures": ["Qwen3ForCausalLM"], "head_dim": 128})
    assert qwen3.qk_norm and not qwen3.attention_bias
    llama_bias = load_config({**base, "attention_bias": True})
    assert llama_bias.attention_bias and llama_bias.o_proj_bias
    mistral = load_config({**base, "architectures": ["MistralForCausalLM"], "sliding_window": None})
    assert mistral.head_dim == 128 and not mistral.attention_bias
    no_arch = {k: v for k, v in base.items() if k != "architectures"}
    assert load_config({**no_arch, "model_type": "qwen3"}).architecture == "Qwen3ForCausalLM"
    assert load_config({**base, "head_dim": None, "hidden_size": 2048}).head_dim == 64


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"architectures": ["GemmaForCausalLM"]}, "GemmaForCausalLM"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"hidden_act": "gelu"}, "gelu"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window"),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 4096,
                "max_window_layers": 0,
            },
            "sliding_window",
        ),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ],
)
def test_unsupported_configs(patch, needle):
    with pytest.raises(UnsupportedModelError, match=needle):
        load_config({**LLAMA31_OLD_STYLE, **patch})


def test_harmless_sliding_windows_accepted():
    mistral = {**LLAMA31_OLD_STYLE, "architectures": ["MistralForCausalLM"]}
    load_config({**mistral, "sliding_window": None})
    load_config({**mistral, "sliding_window": 131072})
    qwen = {**LLAMA31_OLD_STYLE, "architectures": ["Qwen2ForCausalLM"]}
    load_config({**qwen, "sliding_window": 4096, "use_sliding_window": False})


@pytest.mark.parametrize(
    ("theta", "rope", "head_dim"),
    [
        (500000.0, _LLAMA31_ROPE, 128),
        (500000.0, {**_LLAMA31_ROPE, "factor": 32.0}, 64),
        (10000.0, None, 16),
    ],
)
def test_rope_inv_freq_matches_transformers(theta, rope, head_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", **rope} if rope else {"rope_type": "default"}
    kw = {"hidden_size": 32 * head_dim, "num_attention_heads": 32, "head_dim": head_dim}
    hf_cfg = transformers.LlamaConfig(
        **kw, max_position_embeddings=131072, rope_parameters={**params, "rope_theta": theta}
    )
    if rope:
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    else:
        expected = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    ours = rope_inv_freq(load_config(json.loads(hf_cfg.to_json_string())))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- loader


def test_load_dtype_honoured(tmp_path):
    hf = _tiny_hf(tmp_path)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert load_model(tmp_path).dtype == torch.float32  # config dtype float32
    for dtype in (torch.bfloat16, torch.float16, "bfloat16"):
        model = load_model(tmp_path, dtype=dtype)
        want = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        assert {p.dtype for p in model.parameters()} == {want}
        logits = _logits(model, ids)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, ref, rtol=0.1, atol=0.1 * ref.abs().max().item())


def test_dtype_none_uses_config_dtype(tmp_path):
    _tiny_hf(tmp_path, dtype=torch.bfloat16)
    assert load_config(tmp_path).torch_dtype == torch.bfloat16
    model = load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path).dtype == torch.float32  # fallback


def test_tied_embeddings_share_storage(tmp_path):
    _tiny_hf(tmp_path, tie=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == model.config.num_parameters()


@pytest.mark.parametrize(
    ("tie", "drop"),
    [
        (False, "model.layers.1.mlp.up_proj.weight"),
        (False, "lm_head.weight"),
        (True, "model.norm.weight"),
        (True, "model.embed_tokens.weight"),
    ],
)
def test_missing_tensor_raises_with_name(tmp_path, tie, drop):
    _tiny_hf(tmp_path, tie=tie)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors[drop]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(MissingWeightError, match=drop.replace(".", r"\.")):
        load_model(tmp_path)


def test_extra_tensors_ignored_and_tied_lm_head_unused(tmp_path):
    _tiny_hf(tmp_path, tie=True)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, file, metadata={"format": "pt"})
    model = load_model(tmp_path)
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_shape_mismatch_raises(tmp_path):
    _tiny_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"mlp\.\w+_proj\.weight: checkpoint shape"):
        load_model(tmp_path)


def test_unsupported_architecture_checkpoint(tmp_path):
    _tiny_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        load_model(tmp_path)


def test_no_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DUMMY_PRESETS["dummy:tiny"]))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)


def test_progress_bar(tmp_path, capsys):
    _tiny_hf(tmp_path)
    load_model(tmp_path, progress=True)
    assert "loading" in capsys.readouterr().err
    load_model(tmp_path)  # small checkpoint: no bar by default
    assert "loading" not in capsys.readouterr().err


# ---------------------------------------------------------------- dummy presets


def test_dummy_tiny_builds_and_runs():
    model = build_dummy_model("dummy:tiny", torch.float32, "cpu", seed=0)
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (2, 64, 4, 2)
    assert (c.intermediate_size, c.vocab_size) == (128, 512)
    assert sum(p.numel() for p in model.parameters()) == c.num_parameters()
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    w = model.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002
    again = build_dummy_model("dummy:tiny", torch.float32, "cpu", seed=0)
    other = build_dummy_model("dummy:tiny", torch.float32, "cpu", seed=1)
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, w)
    assert not torch.equal(other.model.layers[0].mlp.up_proj.weight, w)
    logits = _logits(model, list(range(10)))
    assert logits.shape == (10, 512) and torch.isfinite(logits).all()
    bf16 = build_dummy_model("dummy:tiny", torch.bfloat16, "cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.isfinite(_logits(bf16, [1, 2, 3])).all()


@pytest.mark.parametrize(
    ("name", "layers", "hidden", "inter", "head_dim", "tied", "factor", "params"),
    [
        ("dummy:llama3-8b", 32, 4096, 14336, 128, False, 8.0, 8_030_261_248),
        ("dummy:llama3.2-1b", 16, 2048, 8192, 64, True, 32.0, 1_235_814_400),
    ],
)
def test_big_presets_config_and_param_count(
    name, layers, hidden, inter, head_dim, tied, factor, params
):
    c = load_config(DUMMY_PRESETS[name])
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.head_dim) == (
        layers,
        hidden,
        inter,
        head_dim,
    )
    assert (c.num_heads, c.num_kv_heads, c.vocab_size) == (32, 8, 128256)
    assert c.tie_word_embeddings is tied
    assert c.rope_scaling.factor == factor and c.rope_theta == 500000.0
    assert c.num_parameters() == params  # published sizes of Llama 3.1 8B / Llama 3.2 1B
    meta = LlamaForCausalLM(c, dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in meta.parameters()) == params
    assert all(p.is_meta for p in meta.parameters())


def test_unknown_preset_lists_presets():
    with pytest.raises(ValidationError) as e:
        build_dummy_model("dummy:gpt5", torch.float32, "cpu")
    for name in DUMMY_PRESETS:
        assert name in str(e.value)


def test_model_config_is_frozen():
    c = load_config(DUMMY_PRESETS["dummy:tiny"])
    assert isinstance(c, ModelConfig)
    with pytest.raises((AttributeError, TypeError)):
        c.hidden_size = 1  # type: ignore[misc]
    assert math.isclose(c.rope_theta, 10000.0)


def test_meta_construction_stays_cheap(tmp_path):
    """Building on ``meta`` must not run nn init (meta init imports torch._dynamo: seconds)."""
    import subprocess
    import sys

    (tmp_path / "config.json").write_text(json.dumps(DUMMY_PRESETS["dummy:tiny"]))
    code = (
        "import sys, torch\n"
        "if 'torch._dynamo' in sys.modules: print('preloaded'); raise SystemExit\n"
        "from layerzero_serve._models import LlamaForCausalLM, build_dummy_model, load_config\n"
        "build_dummy_model('dummy:tiny')\n"
        f"LlamaForCausalLM(load_config({str(tmp_path)!r}), device='meta')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(  # cwd: never the repository root (its kernels/ would shadow PyPI's)
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    if out.stdout.strip() == "preloaded":
        pytest.skip("this torch imports torch._dynamo at import time")
    assert out.stdout.strip() == "False"
