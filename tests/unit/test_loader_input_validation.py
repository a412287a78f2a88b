"""A malformed checkpoint (config.json, safetensors, index, tokenizer.json) raises the project's
ValueError subclass naming the file and the field or tensor, never a raw KeyError / TypeError /
JSONDecodeError / SafetensorError, and never loads a silently reinterpreted value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerzero_serve._model_source import load_checkpoint_tokenizer, load_model_source
from layerzero_serve._models import load_config, load_model
from layerzero_serve.config import EngineConfig
from layerzero_serve.errors import UnsupportedModelError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    """A tiny Llama written by transformers (safetensors) plus a tiny tokenizer.json."""
    from tokenizers import Tokenizer, models

    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(base_ckpt, dst)
    return dst


@pytest.fixture(scope="module")
def raw_cfg(base_ckpt) -> dict:
    return json.loads((base_ckpt / "config.json").read_text())


def _patch(raw: dict, **changes) -> dict:
    out = json.loads(json.dumps(raw))
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _old_style(raw: dict, **changes) -> dict:
    """The same config with top-level rope_theta / rope_scaling (pre-transformers-5 style)."""
    out = _patch(raw, rope_parameters=...)
    out["rope_theta"] = raw["rope_parameters"]["rope_theta"]
    return _patch(out, **changes)


_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


# ---------------------------------------------------------------- valid checkpoints still load


def test_valid_checkpoint_loads(ckpt):
    model = load_model(ckpt)
    assert model.config.hidden_size == 64 and model.config.num_kv_heads == 2
    assert load_checkpoint_tokenizer(ckpt).encode("b").ids == [2]
    assert load_checkpoint_tokenizer(None) is None


def test_valid_variants_accepted(raw_cfg):
    assert load_config(_patch(raw_cfg, num_attention_heads=4.0)).num_heads == 4  # integral float
    assert load_config(_patch(raw_cfg, num_key_value_heads=None)).num_kv_heads == 4
    assert load_config(_patch(raw_cfg, head_dim=None)).head_dim == 16
    assert load_config(_patch(raw_cfg, eos_token_id=[2, 3])).eos_token_ids == (2, 3)
    assert load_config(_patch(raw_cfg, eos_token_id=None, bos_token_id=None)).eos_token_ids == ()
    assert load_config(_patch(raw_cfg, tie_word_embeddings=True)).tie_word_embeddings is True
    assert load_config(_patch(raw_cfg, sliding_window=None)).max_position_embeddings == 2048
    scaled = load_config(_old_style(raw_cfg, rope_scaling=_LLAMA3))
    assert scaled.rope_scaling is not None and scaled.rope_scaling.factor == 8.0
    new = load_config(_patch(raw_cfg, rope_parameters={**_LLAMA3, "rope_theta": 5e5}))
    assert new.rope_theta == 5e5 and new.rope_scaling == scaled.rope_scaling


# ---------------------------------------------------------------- L1: malformed config.json


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", r"config\.json: not valid JSON"),
        ("", r"config\.json: not valid JSON"),
        ("[]", r"config\.json.*JSON object, got list"),
        ('"x"', r"config\.json.*JSON object, got str"),
        (b"\xff\xfe", r"config\.json: not valid JSON"),
    ],
)
def test_unparseable_config_json(ckpt, text, needle):
    path = ckpt / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UnsupportedModelError, match=needle):
        load_config(ckpt)
    with pytest.raises(UnsupportedModelError, match=needle):
        load_model(ckpt)


@pytest.mark.parametrize(
    "field",
    ["hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"],
)
def test_missing_required_field(raw_cfg, field):
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: required field '{field}'"):
        load_config(_patch(raw_cfg, **{field: ...}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", "x"),
        ("hidden_size", "64"),
        ("hidden_size", True),
        ("hidden_size", 0),
        ("vocab_size", -1),
        ("intermediate_size", -1),
        ("intermediate_size", [128]),
        ("num_hidden_layers", 2.5),
        ("num_attention_heads", 4.5),  # L3: was truncated to 4
        ("num_key_value_heads", -1),
        ("num_key_value_heads", 0),
        ("head_dim", -16),
        ("max_position_embeddings", "x"),
        ("max_position_embeddings", float("inf")),
        ("bos_token_id", "x"),
        ("bos_token_id", -1),
        ("eos_token_id", "x"),
        ("eos_token_id", {"id": 2}),
        ("sliding_window", "x"),
        ("max_window_layers", "x"),
    ],
)
def test_bad_int_field(raw_cfg, field, value):
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: {field}=.*integer"):
        load_config(_patch(raw_cfg, **{field: value}))


def test_bad_eos_list_entry(raw_cfg):
    with pytest.raises(UnsupportedModelError, match=r"config\.json: eos_token_id\[1\]=None"):
        load_config(_patch(raw_cfg, eos_token_id=[2, None]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rms_norm_eps", "x"),
        ("rms_norm_eps", None),
        ("partial_rotary_factor", "x"),
    ],
)
def test_bad_float_field(raw_cfg, field, value):
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: {field}="):
        load_config(_patch(raw_cfg, **{field: value}))


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"architectures": "LlamaForCausalLM"}, "architectures"),
        ({"architectures": [1]}, "architectures"),
        ({"architectures": None, "model_type": ["llama"]}, "model_type"),
        ({"rope_parameters": "default"}, "rope_parameters"),
        ({"layer_types": 3}, "layer_types"),
    ],
)
def test_bad_structured_field(raw_cfg, patch, needle):
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: {needle}="):
        load_config(_patch(raw_cfg, **patch))


def test_bad_rope_scaling_type(raw_cfg):
    with pytest.raises(UnsupportedModelError, match=r"config\.json: rope_scaling="):
        load_config(_old_style(raw_cfg, rope_scaling="llama3"))


def test_head_dim_zero_from_sizes(raw_cfg):
    with pytest.raises(UnsupportedModelError, match=r"config\.json: hidden_size=2 .*head_dim"):
        load_config(_patch(raw_cfg, hidden_size=2, head_dim=None))


def test_odd_head_dim_rejected(raw_cfg):
    with pytest.raises(UnsupportedModelError, match="head_dim=15"):
        load_config(_patch(raw_cfg, head_dim=15))


# ---------------------------------------------------------------- L2: break every request


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), "x", None])
def test_bad_rope_theta(raw_cfg, value):
    new = _patch(raw_cfg, rope_parameters={**raw_cfg["rope_parameters"], "rope_theta": value})
    with pytest.raises(UnsupportedModelError, match=r"config\.json: rope_parameters\.rope_theta="):
        load_config(new)
    with pytest.raises(UnsupportedModelError, match=r"config\.json: rope_theta="):
        load_config(_old_style(raw_cfg, rope_theta=value))


@pytest.mark.parametrize("value", [0, -1e-6, float("nan"), float("inf")])
def test_bad_rms_norm_eps(raw_cfg, value):
    with pytest.raises(UnsupportedModelError, match=r"config\.json: rms_norm_eps="):
        load_config(_patch(raw_cfg, rms_norm_eps=value))


def test_nan_eps_in_file(ckpt):
    path = ckpt / "config.json"
    path.write_text(path.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: rms_norm_eps=nan"):
        load_model(ckpt)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("factor", 0),
        ("factor", "x"),
        ("factor", -8.0),
        ("low_freq_factor", 0),
        ("high_freq_factor", 0.0),
        ("high_freq_factor", float("nan")),
        ("original_max_position_embeddings", 0),
        ("original_max_position_embeddings", "8192"),
    ],
)
def test_bad_llama3_rope_fields(raw_cfg, field, value):
    bad = {**_LLAMA3, field: value}
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: rope_scaling\.{field}="):
        load_config(_old_style(raw_cfg, rope_scaling=bad))
    new = _patch(raw_cfg, rope_parameters={**bad, "rope_theta": 5e5})
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: rope_parameters\.{field}="):
        load_config(new)


def test_llama3_equal_freq_factors(raw_cfg):
    bad = {**_LLAMA3, "low_freq_factor": 2.0, "high_freq_factor": 2.0}
    with pytest.raises(UnsupportedModelError, match=r"config\.json: rope_scaling\.high_freq"):
        load_config(_old_style(raw_cfg, rope_scaling=bad))


# ---------------------------------------------------------------- L3: no silent reinterpretation


@pytest.mark.parametrize(
    "field", ["tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"]
)
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_bool_fields_need_json_bool(raw_cfg, field, value):
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: {field}=.*true or false"):
        load_config(_patch(raw_cfg, **{field: value}))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_non_float_weight_rejected(ckpt, dtype):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=rf"model\.safetensors: tensor {key}"):
        load_model(ckpt)


def test_half_precision_weights_still_load(ckpt):
    file = ckpt / "model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "pt"})
    model = load_model(ckpt, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32


# ---------------------------------------------------------------- safetensors / index files


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b"",
        lambda b: b"\x00" * 100,
        lambda b: b[:5000],  # truncated
        lambda b: b"\xff" * 8 + b[8:],  # absurd header length
    ],
    ids=["empty", "zeros", "truncated", "header_len"],
)
def test_corrupt_safetensors(ckpt, corrupt):
    file = ckpt / "model.safetensors"
    file.write_bytes(corrupt(file.read_bytes()))
    with pytest.raises(UnsupportedModelError, match=r"model\.safetensors: not a valid safetensors"):
        load_model(ckpt)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", "not valid JSON"),
        ("{}", "weight_map"),
        ("[]", "weight_map"),
        ('{"weight_map": []}', "weight_map"),
        ('{"weight_map": {"a": 3}}', r"weight_map\['a'\]=3"),
        ('{"weight_map": {"a": "../model.safetensors"}}', "weight_map"),
    ],
)
def test_bad_index_json(ckpt, text, needle):
    (ckpt / "model.safetensors.index.json").write_text(text)
    with pytest.raises(
        UnsupportedModelError, match=rf"model\.safetensors\.index\.json: .*{needle}"
    ):
        load_model(ckpt)


def test_index_naming_absent_shard(ckpt):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
        load_model(ckpt)


def test_valid_index_still_loads(ckpt):
    keys = load_file(ckpt / "model.safetensors").keys()
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model.safetensors")}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_model(ckpt).config.vocab_size == 256


# ---------------------------------------------------------------- L4: tokenizer.json


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "[]",
        '{"model": {1: 0}}',  # tokenizers: bare "Exception: key must be a string"
        '{"model": {"type": "WordLevel", "vocab": {"a": [3]}, "unk_token": "a"}}',
        '{"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}, "merges": [1]}}',
    ],
)
def test_corrupt_tokenizer_json(ckpt, text):
    (ckpt / "tokenizer.json").write_text(text)
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.json"):
        load_checkpoint_tokenizer(ckpt)
    # the engine reads the tokenizer at load time too (it speaks text): the same clear error
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.json"):
        load_model_source(EngineConfig(model=str(ckpt), device="cpu"))


def test_corrupt_tokenizer_through_llm(ckpt):
    from layerzero_serve import LLM

    (ckpt / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": {"a": [1]}}}')
    with pytest.raises(UnsupportedModelError, match=r"tokenizer\.json"):
        LLM(str(ckpt), device="cpu")
