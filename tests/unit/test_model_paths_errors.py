"""A wrong model path, an absent weights file or shard, .bin-only weights and token ids outside
the vocabulary fail at load time with a ValueError that says which problem applies and names
the file or field; a model too large for the device's available memory fails before anything
is allocated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import layerzero_serve._model_source as model_source
from layerzero_serve._cli import main
from layerzero_serve._model_source import load_model_source
from layerzero_serve._models import DUMMY_PRESETS, build_dummy_model, load_config, load_model
from layerzero_serve.config import EngineConfig
from layerzero_serve.errors import (
    InsufficientMemoryError,
    ModelPathError,
    UnsupportedModelError,
    ValidationError,
)
from layerzero_serve.selection import _device

TINY = DUMMY_PRESETS["dummy:tiny"]  # vocab_size 512
GiB = 1 << 30


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps(TINY))
    model = build_dummy_model("dummy:tiny", torch.float32, "cpu")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "m.safetensors")
    return path


@pytest.fixture
def ckpt(base_ckpt, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in base_ckpt.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _load(model: str | Path):
    return load_model_source(EngineConfig(model=str(model), device="cpu"))


def _one_line_cli_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------ 1. token ids outside the vocabulary


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("eos_token_id", 512, "eos_token_id"),
        ("eos_token_id", [2, 600], "eos_token_id[1]"),
        ("bos_token_id", 512, "bos_token_id"),
        ("pad_token_id", 100000, "pad_token_id"),
        ("pad_token_id", [0, 512], "pad_token_id[1]"),
        ("pad_token_id", -1, "pad_token_id"),
    ],
)
def test_token_id_outside_vocab_rejected_at_load(ckpt, field, value, shown):
    with pytest.raises(UnsupportedModelError, match=rf"config\.json: {field}") as ei:
        load_config({**TINY, field: value})
    msg = str(ei.value)
    assert shown in msg and "[0, 511]" in msg and "vocab_size=512" in msg
    (ckpt / "config.json").write_text(json.dumps({**TINY, field: value}))
    with pytest.raises(ValueError, match=r"config\.json: " + field.replace("[", r"\[")):
        _load(ckpt)


def test_token_ids_inside_vocab_accepted():
    cfg = load_config({**TINY, "eos_token_id": [2, 511], "bos_token_id": 0, "pad_token_id": 511})
    assert cfg.eos_token_ids == (2, 511) and cfg.bos_token_id == 0
    assert load_config({**TINY, "pad_token_id": None, "eos_token_id": None}).eos_token_ids == ()


# ------------------------------------------------ 2. missing weights file or shard


def test_index_naming_absent_shard_is_a_value_error_naming_it(ckpt):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    for load in (load_model, _load):
        with pytest.raises(ValueError, match="model-00002-of-00002.safetensors") as ei:
            load(ckpt)
        assert isinstance(ei.value, ModelPathError) and isinstance(ei.value, FileNotFoundError)
        assert "model.safetensors.index.json" in str(ei.value)
        assert ei.value.path == ckpt / "model-00002-of-00002.safetensors"


def test_no_weights_at_all_is_a_value_error_naming_the_directory(ckpt):
    (ckpt / "m.safetensors").unlink()
    for load in (load_model, _load):
        with pytest.raises(ValueError, match="no weights") as ei:
            load(ckpt)
        assert isinstance(ei.value, ModelPathError)
        assert str(ckpt) in str(ei.value) and "model.safetensors" in str(ei.value)


# ------------------------------------------------ 3. which model-path problem applies


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelPathError, match="no such file or directory") as ei:
        _load(missing)
    assert isinstance(ei.value, ValidationError) and ei.value.param == "model"
    assert "'default'" in str(ei.value) and "dummy:<preset>" in str(ei.value)
    with pytest.raises(ModelPathError, match="no such file or directory"):
        load_config(missing)


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelPathError, match=r"has no config\.json"):
        _load(tmp_path)
    with pytest.raises(ModelPathError, match=r"has no config\.json"):
        load_model(tmp_path)


def test_a_file_is_not_a_checkpoint_directory(ckpt):
    with pytest.raises(ModelPathError, match="is a file, not a checkpoint directory"):
        _load(ckpt / "config.json")


def test_hub_id_says_downloading_is_not_supported(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local ./meta-llama/Llama-3.2-1B
    with pytest.raises(ModelPathError) as ei:
        _load("meta-llama/Llama-3.2-1B")
    msg = str(ei.value)
    assert "Hugging Face Hub id" in msg and "downloading is not supported" in msg
    assert "'default'" in msg and "dummy:<preset>" in msg and "directory" in msg
    line = _one_line_cli_error(capsys, ["generate", "--model", "meta-llama/Llama-3.2-1B"])
    assert "--model='meta-llama/Llama-3.2-1B'" in line and "Hub id" in line
    line = _one_line_cli_error(capsys, ["doctor", "--model", "meta-llama/Llama-3.2-1B"])
    assert "Hub id" in line


def test_a_local_directory_shaped_like_a_hub_id_is_used(base_ckpt, monkeypatch, tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").symlink_to(base_ckpt)
    monkeypatch.chdir(tmp_path)
    assert _load("org/name").config.vocab_size == 512


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.00.pth", "model.gguf"])
def test_bin_only_weights_unsupported_with_convert_hint(ckpt, name):
    (ckpt / "m.safetensors").unlink()
    (ckpt / name).write_bytes(b"\0" * 16)
    for load in (load_model, _load):
        with pytest.raises(UnsupportedModelError, match=name.replace(".", r"\.")) as ei:
            load(ckpt)
        msg = str(ei.value)
        assert "convert it to safetensors" in msg and "safe_serialization=True" in msg
        assert str(ckpt) in msg


# ------------------------------------------------ 4. weights larger than available memory


def test_8b_dummy_on_a_small_cpu_fails_before_allocating(monkeypatch, capsys):
    monkeypatch.setattr(model_source, "available_memory", lambda dev: (8 * GiB, "test meminfo"))

    def no_build(*a, **k):
        raise AssertionError("the model was built before the memory check")

    monkeypatch.setattr(model_source, "build_dummy_model", no_build)
    with pytest.raises(InsufficientMemoryError) as ei:
        _load("dummy:llama3-8b")
    e = ei.value
    assert isinstance(e, MemoryError) and isinstance(e, ValueError)
    assert e.needed == 8_030_261_248 * 4 and e.available == 8 * GiB
    msg = str(e)
    assert "29.9 GiB" in msg and "8.0 GiB" in msg and "float32" in msg and "bfloat16" in msg
    line = _one_line_cli_error(capsys, ["generate", "--model", "dummy:llama3-8b", "--quiet"])
    assert "29.9 GiB" in line and "8.0 GiB is available" in line


def test_checkpoint_larger_than_memory_fails_before_loading(ckpt, monkeypatch):
    monkeypatch.setattr(model_source, "available_memory", lambda dev: (1000, "test"))
    monkeypatch.setattr(model_source, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(InsufficientMemoryError, match="0.0 GiB"):
        _load(ckpt)


def test_enough_memory_loads(monkeypatch):
    monkeypatch.setattr(model_source, "available_memory", lambda dev: (1 * GiB, "test"))
    assert _load("dummy:tiny").config.vocab_size == 512
    monkeypatch.setattr(model_source, "available_memory", lambda dev: None)  # unknown: no check
    assert _load("dummy:tiny").config.vocab_size == 512


def test_available_memory_sources(monkeypatch):
    monkeypatch.setattr(_device, "host_memory", lambda root="/": (3 * GiB, 4 * GiB))
    assert _device.available_memory("cpu") == (3 * GiB, "host RAM, MemAvailable")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (5 * GiB, 80 * GiB))
    free, source = _device.available_memory("cuda:0")
    assert free == 5 * GiB and "cuda:0" in source


def _fake_root(tmp_path: Path, meminfo: str, cgroup: dict[str, str] | None = None) -> Path:
    (tmp_path / "proc").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").write_text(meminfo)
    for rel, text in (cgroup or {}).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_host_memory_reads_meminfo_and_cgroup_limit(tmp_path):
    meminfo = "MemTotal:       65536000 kB\nMemFree: 1000 kB\nMemAvailable:   32768000 kB\n"
    root = _fake_root(tmp_path / "a", meminfo)
    assert _device.host_memory(root) == (32768000 * 1024, 65536000 * 1024)
    limited = _fake_root(
        tmp_path / "b",
        meminfo,
        {
            "sys/fs/cgroup/memory.max": str(16 * GiB),
            "sys/fs/cgroup/memory.current": str(10 * GiB),
            "sys/fs/cgroup/memory.stat": f"anon 1\ninactive_file {GiB}\n",
        },
    )
    assert _device.host_memory(limited) == (7 * GiB, 16 * GiB)
    unlimited = _fake_root(
        tmp_path / "c",
        meminfo,
        {"sys/fs/cgroup/memory.max": "max", "sys/fs/cgroup/memory.current": "5"},
    )
    assert _device.host_memory(unlimited) == (32768000 * 1024, 65536000 * 1024)


def test_cpu_probe_reports_host_memory():
    info = _device._probe.__wrapped__(None)
    if info.type == "cpu":
        assert info.total_memory > 0 and 0 < info.free_memory <= info.total_memory
        assert info.name
