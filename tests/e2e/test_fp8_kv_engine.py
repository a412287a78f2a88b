"""The engine with an FP8 KV cache (``kv_cache_dtype``): the same inputs scored with FP8 and
with float32 K/V (teacher-forced prompt logprobs: every position's attention reads the cache),
the pool's capacity per byte, greedy agreement, scales read from the checkpoint, and the
clear errors for an unknown dtype and for bad scales in a checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from hf_checkpoints import make_checkpoint
from safetensors.torch import save_file

from layerzero_serve.engine import Engine
from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import SamplingParams

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _, cfg = make_checkpoint("llama-gqa-tied", tmp_path_factory.mktemp("fp8"))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 24, 41)]
    return path, cfg, prompts


def _engine(path, **cfg) -> Engine:
    return Engine(model=str(path), dtype="float32", device="cpu", block_size=4, **cfg)


def _prompt_logprobs(eng: Engine, prompts) -> list[float]:
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    for i, p in enumerate(prompts):
        eng.add_request(p, sp, request_id=str(i))
    out: dict[str, list[float]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.prompt_logprobs is not None:
                out[o.request_id] = [lp.logprob for lp in o.prompt_logprobs if lp is not None]
    return [x for i in range(len(prompts)) for x in out[str(i)]]


@pytest.mark.parametrize(("kv_dtype", "max_err", "mean_err"), [
    ("fp8_e4m3", 0.15, 0.03),
    ("fp8_e5m2", 0.3, 0.06),
])  # fmt: skip
def test_fp8_scores_the_same_inputs_within_the_stated_bound(
    checkpoint, kv_dtype, max_err, mean_err
):
    path, _, prompts = checkpoint
    ref = _prompt_logprobs(_engine(path), prompts)
    got = _prompt_logprobs(_engine(path, kv_cache_dtype=kv_dtype), prompts)
    err = torch.tensor(got, dtype=torch.float64) - torch.tensor(ref, dtype=torch.float64)
    assert len(ref) == sum(len(p) - 1 for p in prompts)
    assert 0 < err.abs().max() < max_err, float(err.abs().max())  # quantized, and close
    assert err.abs().mean() < mean_err, float(err.abs().mean())


def test_fp8_holds_four_times_the_tokens_of_float32_per_byte(checkpoint):
    path, _, _ = checkpoint
    budget = 1 << 20
    auto = _engine(path, kv_cache_bytes=budget).kv_manager.num_blocks
    fp8 = _engine(path, kv_cache_bytes=budget, kv_cache_dtype="fp8_e4m3").kv_manager.num_blocks
    assert fp8 == 4 * auto or fp8 == 4 * auto - 3  # the null block is counted once in each


def test_fp8_greedy_runs_and_frees_everything(checkpoint):
    path, _, prompts = checkpoint
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = {}
    for kv_dtype in ("auto", "fp8_e4m3"):
        eng = _engine(path, kv_cache_dtype=kv_dtype)
        res = {}
        for i, p in enumerate(prompts):
            eng.add_request(p, sp, request_id=str(i))
        while eng.has_unfinished():
            for o in eng.step():
                res.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert eng.stats()["kv_cache"]["used"] == 0
        outs[kv_dtype] = res
    assert all(len(v) == 8 for v in outs["fp8_e4m3"].values())
    auto, fp8 = outs["auto"], outs["fp8_e4m3"]
    pairs = [p for i in auto for p in zip(auto[i], fp8[i], strict=True)]
    agree = sum(a == b for a, b in pairs)
    assert agree >= 8  # the first tokens at least: the error is small, not random


def _with_scales(src, dst, k, v):
    """A copy of checkpoint ``src`` whose ``model.safetensors`` also holds the scales (where
    quantization tools put them, next to the weights)."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for i in range(len(k)):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(k[i])
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(v[i])
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_checkpoint_scales_are_used(checkpoint, tmp_path):
    path, cfg, prompts = checkpoint
    n = cfg.num_hidden_layers
    scaled = _with_scales(path, tmp_path / "ck", [0.02 * (i + 1) for i in range(n)], [0.01] * n)
    eng = _engine(scaled, kv_cache_dtype="fp8_e4m3")
    cache = eng.runner.kv_cache
    assert cache.k_scales == pytest.approx([0.02 * (i + 1) for i in range(n)])
    assert cache.v_scales == pytest.approx([0.01] * n)
    ref = _prompt_logprobs(_engine(path), prompts)
    got = _prompt_logprobs(eng, prompts)
    err = max(abs(a - b) for a, b in zip(got, ref, strict=True))
    assert err < 0.15 and math.isfinite(err)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.5])
def test_bad_checkpoint_scales_are_named(checkpoint, tmp_path, bad):
    path, cfg, _ = checkpoint
    n = cfg.num_hidden_layers
    ks = [1.0] * n
    ks[1] = bad
    scaled = _with_scales(path, tmp_path / "bad", ks, [1.0] * n)
    with pytest.raises(ValidationError) as ei:
        _engine(scaled, kv_cache_dtype="fp8_e4m3")
    assert ei.value.param == "model.layers.1.self_attn.k_scale"


@pytest.mark.parametrize("bad", ["fp8", "int8", "float8_e4m3fn", 8, None])
def test_unknown_kv_cache_dtype(bad):
    with pytest.raises(ValidationError) as ei:
        Engine(model="dummy:tiny", device="cpu", kv_cache_dtype=bad)
    assert ei.value.param == "kv_cache_dtype"
