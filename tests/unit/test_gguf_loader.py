"""The GGUF loader on tiny files written like llama.cpp's converter writes them, against
transformers: the model that was written (its parameters exactly, for F32 files) and
transformers' own GGUF reader (``load_gguf_checkpoint``, for quantized files and to confirm
the test's writer lays files out as real GGUF files are)."""

from __future__ import annotations

import dataclasses

import gguf
import pytest
import torch
from gguf_tiny import tiny_hf_model, write_gguf

from layerzero_serve._model_source import load_model_source
from layerzero_serve._models import load_config
from layerzero_serve._models.gguf import gguf_model_config, load_gguf_model
from layerzero_serve._models.gguf_tokenizer import gguf_text_assets
from layerzero_serve._models.paths import find_gguf
from layerzero_serve.config import EngineConfig
from layerzero_serve.errors import MissingWeightError, ModelPathError, UnsupportedModelError

Q = gguf.GGMLQuantizationType

CASES = {
    "llama-gqa-untied": ("llama", {"tie_word_embeddings": False}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-qknorm": ("qwen3", {"tie_word_embeddings": False}),
}


def _hf_gguf_state(path, hf_model):
    """The tensors transformers' own GGUF reader maps out of ``path`` (float32)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    got = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf_model)
    return {k: v.float() for k, v in got["tensors"].items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_f32_file_loads_the_written_parameters_exactly(case, tmp_path):
    arch, kw = CASES[case]
    hf = tiny_hf_model(arch, **kw)
    path = write_gguf(tmp_path / "m.gguf", hf, arch)
    cfg = gguf_model_config(path)
    want_cfg = load_config(hf.config.to_dict())
    for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers"):
        assert getattr(cfg, field) == getattr(want_cfg, field), field
    for field in ("num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "qk_norm"):
        assert getattr(cfg, field) == getattr(want_cfg, field), field
    assert (cfg.attention_bias, cfg.rope_theta) == (want_cfg.attention_bias, want_cfg.rope_theta)
    assert cfg.rms_norm_eps == pytest.approx(want_cfg.rms_norm_eps)
    model = load_gguf_model(path, torch.float32)
    ours = model.state_dict()
    want = hf.state_dict()
    assert set(ours) == {k for k in want if not k.endswith("rotary_emb.inv_freq")}
    for name, value in want.items():
        if name in ours:
            assert torch.equal(ours[name], value), name
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # the writer lays the file out as transformers' reader expects real files to be
    for name, value in _hf_gguf_state(path, hf).items():
        assert torch.equal(value, want[name]), name


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1])
def test_quantized_llama_matches_transformers_reader(qtype, tmp_path):
    hf = tiny_hf_model("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1)
    path = write_gguf(tmp_path / "q.gguf", hf, "llama", qtype=qtype)
    ours = load_gguf_model(path, torch.float32).state_dict()
    ref = _hf_gguf_state(path, hf)
    for name, value in ref.items():
        assert torch.equal(ours[name], value), name
    # quantization noise, not a layout error: close to the written weights
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert (q - hf.state_dict()["model.layers.0.self_attn.q_proj.weight"]).abs().mean() < 0.05


def test_dtype_and_file_type(tmp_path):
    hf = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "m.gguf", hf, metadata={"general.file_type": 1})
    assert gguf_model_config(path).torch_dtype == torch.float16
    model = load_gguf_model(path)  # dtype None: the file's
    assert model.model.embed_tokens.weight.dtype == torch.float16
    model = load_gguf_model(path, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = tiny_hf_model("llama", head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    hf.config.rope_parameters = rope
    want = load_config(hf.config.to_dict())
    from layerzero_serve._models.layers import rope_inv_freq

    plain = rope_inv_freq(dataclasses.replace(want, rope_scaling=None))
    factors = (plain / rope_inv_freq(want)).numpy()  # what llama.cpp stores
    path = tmp_path / "r.gguf"
    write_gguf(path, hf, metadata={"llama.rope.freq_base": 500000.0})
    _add_tensor(path, tmp_path, "rope_freqs.weight", factors, out="good.gguf")
    assert gguf_model_config(tmp_path / "good.gguf").rope_scaling == want.rope_scaling
    _add_tensor(path, tmp_path, "rope_freqs.weight", factors * 1.5, out="bad.gguf")
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        gguf_model_config(tmp_path / "bad.gguf")


def _add_tensor(src, tmp_path, name, values, out):
    """Copy ``src`` to ``out`` with one more tensor."""
    reader = gguf.GGUFReader(src)
    dst = tmp_path / out
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.add_tensor(name, values.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_names_it(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"), architecture="mamba")
    with pytest.raises(UnsupportedModelError, match="'mamba'") as ei:
        gguf_model_config(path)
    assert str(path) in str(ei.value) and "llama" in str(ei.value)


def test_unsupported_quantization_names_tensor_and_type(tmp_path):
    hf = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "m.gguf", hf, raw_types={"blk.1.ffn_up.weight": Q.Q8_1})
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.ffn_up\.weight.*Q8_1") as ei:
        load_gguf_model(path)
    assert str(path) in str(ei.value)


def test_missing_and_misshapen_tensors(tmp_path):
    hf = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "a.gguf", hf, drop=("blk.1.attn_v.weight",))
    with pytest.raises(MissingWeightError, match=r"model\.layers\.1\.self_attn\.v_proj"):
        load_gguf_model(path)
    path = write_gguf(tmp_path / "b.gguf", hf, metadata={"llama.feed_forward_length": 96})
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_\w+\.weight has shape"):
        load_gguf_model(path)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("llama.attention.head_count", "four", "head_count='four'"),
        ("llama.block_count", None, "required metadata key 'llama.block_count'"),
        ("llama.rope.freq_base", -1.0, "freq_base=-1.0"),
        ("llama.rope.scaling.type", "yarn", "yarn"),
        ("llama.rope.dimension_count", 8, "partial rotary"),
    ],
)
def test_bad_metadata_names_the_key(tmp_path, key, value, needle):
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"), metadata={key: value})
    with pytest.raises(UnsupportedModelError, match=needle) as ei:
        gguf_model_config(path)
    assert str(path) in str(ei.value)


def test_an_out_of_vocabulary_special_id_is_ignored_with_a_warning(tmp_path, caplog):
    """As llama.cpp does: the model is still usable without that special token."""
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_model("llama"),
                      metadata={"tokenizer.ggml.eos_token_id": 9999})  # fmt: skip
    with caplog.at_level("WARNING", logger="layerzero_serve"):
        cfg = gguf_model_config(path)
    assert 9999 not in list(getattr(cfg, "eos_token_ids", ()) or ())
    assert "eos_token_id=9999" in caplog.text


def test_bad_tokenizer_metadata(tmp_path):
    hf = tiny_hf_model("llama")
    path = write_gguf(tmp_path / "a.gguf", hf, metadata={"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(UnsupportedModelError, match="no-such-pre"):
        gguf_text_assets(path)
    path = write_gguf(tmp_path / "b.gguf", hf, metadata={"tokenizer.ggml.model": "rwkv"})
    with pytest.raises(UnsupportedModelError, match="rwkv"):
        gguf_text_assets(path)


def test_model_source_accepts_file_and_single_file_directory(tmp_path):
    hf = tiny_hf_model("llama")
    one = tmp_path / "one"
    one.mkdir()
    path = write_gguf(one / "m.gguf", hf)
    assert find_gguf(path) == path and find_gguf(one) == path
    loaded = load_model_source(EngineConfig(model=str(one), device="cpu", dtype="float32"))
    assert loaded.path == path and loaded.text is not None
    assert loaded.text.tokenizer.get_vocab_size() == hf.config.vocab_size
    assert loaded.text.generation_config["eos_token_id"] == 2
    write_gguf(one / "n.gguf", hf)
    with pytest.raises(ModelPathError, match="2 GGUF files"):
        find_gguf(one)
    with pytest.raises(ModelPathError, match="no such GGUF file"):
        load_model_source(EngineConfig(model=str(tmp_path / "nope.gguf"), device="cpu"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(UnsupportedModelError, match="not a valid GGUF file"):
        load_model_source(EngineConfig(model=str(tmp_path / "junk.gguf"), device="cpu"))


def _spm_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A tiny SentencePiece vocabulary laid out as llama.cpp stores Llama 2's: <unk> <s> </s>,
    256 byte tokens, then pieces best first (score = -rank)."""
    pieces = ["\u2581", *"abcdefghijklmnopqrstuvwxyz"]
    pieces += [
        "\u2581t", "he", "\u2581the", "\u2581a", "in", "ing", "\u2581in", "er", "\u2581w",
        "or", "ld", "\u2581wor", "\u2581world", "lo", "ll", "llo", "\u2581he", "\u2581hello",
        "an", "\u2581an", "nd", "\u2581and", "on", "\u2581on", "at", "\u2581at", "es", "st",
        "est", "\u2581test", "th", "\u2581th", "ed", "\u2581s",
    ]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(pieces)))]
    assert len(tokens) == n, len(tokens)
    return tokens, scores, types


def test_sentencepiece_vocab_matches_transformers(tmp_path):
    hf = tiny_hf_model("llama")
    tokens, scores, types = _spm_vocab(hf.config.vocab_size)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": None,
        "tokenizer.ggml.merges": None,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    path = write_gguf(tmp_path / "spm.gguf", hf, metadata=meta)
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    text = gguf_text_assets(path)
    assert text.add_bos_token and text.bos_token == "<s>"
    # (text starting with a space differs on purpose: transformers' GGUF conversion uses a
    # Metaspace that does not prepend a second "▁"; llama.cpp, SentencePiece and Llama 2's
    # tokenizer.json do, and so do we)
    for s in ["hello world", "the test and the answer", "Héllo wörld 42!", "a  b\nthe  end "]:
        assert text.tokenizer.encode(s).ids == ref(s)["input_ids"], s
        ids = text.tokenizer.encode(s, add_special_tokens=False).ids
        assert text.tokenizer.decode(ids) == ref.decode(ids), s
