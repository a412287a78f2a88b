"""EngineConfig, SchedulerConfig and the CPU thread count reject every bad public input with a
ValidationError that names the parameter, at construction, and keep accepting valid values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from layerzero_serve.config import MAX_KV_CACHE_BYTES, EngineConfig
from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache._block_pool import MAX_NUM_BLOCKS
from layerzero_serve.runner._cpu_threads import MAX_CPU_THREADS, choose_cpu_threads
from layerzero_serve.scheduler import SchedulerConfig

BIG = 2**70

ENGINE_BAD = [
    ("model", None),
    ("model", 3),
    ("model", 1.5),
    ("model", ""),
    ("model", b"dummy:tiny"),
    ("dtype", ["float32"]),
    ("dtype", {}),
    ("dtype", None),
    ("dtype", "int8"),
    ("device", 3),
    ("device", None),
    ("device", "tpu"),
    ("device", "cuda:x"),
    ("device", "cuda:"),
    ("block_size", True),
    ("block_size", 1.5),
    ("block_size", "16"),
    ("block_size", 0),
    ("block_size", 257),
    ("num_kv_blocks", "x"),
    ("num_kv_blocks", [1]),
    ("num_kv_blocks", math.nan),
    ("num_kv_blocks", math.inf),
    ("num_kv_blocks", BIG),
    ("num_kv_blocks", MAX_NUM_BLOCKS + 1),
    ("num_kv_blocks", True),
    ("num_kv_blocks", 1),
    ("num_kv_blocks", 64.0),
    ("kv_cache_bytes", "x"),
    ("kv_cache_bytes", [1]),
    ("kv_cache_bytes", math.nan),
    ("kv_cache_bytes", math.inf),
    ("kv_cache_bytes", -math.inf),
    ("kv_cache_bytes", BIG),
    ("kv_cache_bytes", MAX_KV_CACHE_BYTES + 1),
    ("kv_cache_bytes", True),
    ("kv_cache_bytes", 0),
    ("kv_cache_bytes", -5),
    ("gpu_memory_utilization", "x"),
    ("gpu_memory_utilization", [0.5]),
    ("gpu_memory_utilization", True),
    ("gpu_memory_utilization", math.nan),
    ("gpu_memory_utilization", math.inf),
    ("gpu_memory_utilization", 0),
    ("gpu_memory_utilization", 1.5),
    ("max_model_len", "x"),
    ("max_model_len", [1]),
    ("max_model_len", 1.5),
    ("max_model_len", True),
    ("max_model_len", BIG),
    ("max_model_len", 2**31),
    ("max_model_len", 1),
    ("max_num_seqs", "x"),
    ("max_num_seqs", None),
    ("max_num_seqs", 1.5),
    ("max_num_seqs", BIG),
    ("max_num_seqs", 0),
    ("max_num_seqs", -1),
    ("max_num_seqs", True),
    ("max_num_batched_tokens", "x"),
    ("max_num_batched_tokens", None),
    ("max_num_batched_tokens", True),
    ("max_num_batched_tokens", 0),
    ("max_num_batched_tokens", BIG),
    ("max_prefill_chunk", 1.5),
    ("max_prefill_chunk", True),
    ("max_prefill_chunk", -1),
    ("max_prefill_chunk", BIG),
    ("policy", ["fcfs"]),
    ("policy", None),
    ("policy", "lifo"),
    ("prefix_hash", ["sha256"]),
    ("prefix_hash", None),
    ("seed", "x"),
    ("seed", 1.5),
    ("seed", None),
    ("seed", True),
    ("seed", [1]),
    ("seed", BIG),
    ("seed", 2**63),
    ("seed", -(2**63) - 1),
    ("cpu_threads", True),
    ("cpu_threads", 0),
    ("cpu_threads", -1),
    ("cpu_threads", 1.5),
    ("cpu_threads", "4"),
    ("cpu_threads", 30000),
    ("cpu_threads", 100000),
    ("cpu_threads", BIG),
    ("cpu_threads", MAX_CPU_THREADS + 1),
    ("max_graph_batch", "x"),
    ("max_graph_batch", [8]),
    ("max_graph_batch", 1.5),
    ("max_graph_batch", True),
    ("max_graph_batch", 0),
    ("max_graph_batch", 1025),
    ("enable_prefix_caching", "x"),
    ("enable_prefix_caching", None),
    ("enable_prefix_caching", 1),
    ("enforce_eager", "x"),
    ("enforce_eager", None),
    ("enforce_eager", 0),
    ("enable_chunked_prefill", "x"),
    ("enable_chunked_prefill", None),
    ("adaptive_speculation", 1),
    ("async_scheduling", "yes"),
    ("speculative_method", ["ngram"]),
    ("speculative_method", "medusa"),
    ("num_speculative_tokens", True),
    ("num_speculative_tokens", 2.0),
    ("ngram_min", True),
]


@pytest.mark.parametrize(("field", "value"), ENGINE_BAD)
def test_engine_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field.split("_")[0]) as ei:
        EngineConfig(**{field: value})
    assert field in ei.value.param
    assert isinstance(ei.value, ValueError)
    assert ei.value.allowed


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"speculative_method": "draft_model", "speculative_model": 3}, "speculative_model"),
        ({"speculative_method": "draft_model", "speculative_model": ""}, "speculative_model"),
        ({"speculative_method": "draft_model"}, "speculative_model"),
        ({"speculative_model": "dummy:tiny"}, "speculative_model"),
        ({"num_kv_blocks": 64, "kv_cache_bytes": 1 << 20}, "num_kv_blocks/kv_cache_bytes"),
        ({"enable_chunked_prefill": False, "max_prefill_chunk": 8}, "max_prefill_chunk"),
    ],
)
def test_engine_config_rejects_bad_combinations(kwargs, param):
    with pytest.raises(ValidationError, match=param.split("/")[0]) as ei:
        EngineConfig(**kwargs)
    assert ei.value.param == param


def test_max_num_seqs_zero_names_max_num_seqs():
    with pytest.raises(ValidationError, match="max_num_seqs") as ei:
        EngineConfig(max_num_seqs=0)
    assert ei.value.param == "max_num_seqs"


def test_engine_rejects_bad_values_before_loading_anything():
    from layerzero_serve.engine import Engine

    for field, value in [
        ("cpu_threads", 100000),
        ("max_num_seqs", "x"),
        ("seed", BIG),
        ("kv_cache_bytes", math.nan),
        ("num_kv_blocks", BIG),
    ]:
        with pytest.raises(ValidationError, match=field):
            Engine(model="dummy:tiny", device="cpu", **{field: value})


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"model": "dummy:tiny", "device": "cpu", "dtype": "float32"},
        {"model": "default", "device": "auto", "dtype": "auto"},
        {"device": "cuda", "dtype": "bfloat16"},
        {"device": "cuda:0", "dtype": "float16"},
        {"device": "cuda:13"},
        {"block_size": 1},
        {"block_size": 256},
        {"num_kv_blocks": 2},
        {"num_kv_blocks": MAX_NUM_BLOCKS},
        {"kv_cache_bytes": 1},
        {"kv_cache_bytes": 1 << 30},
        {"kv_cache_bytes": MAX_KV_CACHE_BYTES},
        {"gpu_memory_utilization": 1},
        {"gpu_memory_utilization": 1e-3},
        {"max_model_len": 2},
        {"max_model_len": 2**31 - 1},
        {"max_num_seqs": 1},
        {"max_num_seqs": 65536},
        {"max_num_batched_tokens": 1},
        {"max_prefill_chunk": 512},
        {"enable_chunked_prefill": False, "max_prefill_chunk": 0},
        {"policy": "priority"},
        {"prefix_hash": "fast", "enable_prefix_caching": False},
        {"seed": -1},
        {"seed": 2**63 - 1},
        {"seed": -(2**63)},
        {"cpu_threads": 1},
        {"cpu_threads": MAX_CPU_THREADS},
        {"enforce_eager": True, "max_graph_batch": 1},
        {"max_graph_batch": 1024},
        {"speculative_method": "ngram", "ngram_min": 1, "ngram_max": 32},
        {"speculative_method": "draft_model", "speculative_model": "dummy:tiny"},
        {"adaptive_speculation": False, "async_scheduling": False},
    ],
)
def test_engine_config_keeps_valid_values(kwargs):
    cfg = EngineConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == value


def test_engine_config_normalises_paths_numpy_ints_and_devices():
    cfg = EngineConfig(
        model=Path("/tmp/some/checkpoint"),
        device=torch.device("cpu"),
        num_kv_blocks=np.int64(64),
        max_num_seqs=np.int32(8),
        seed=np.uint32(7),
    )
    assert cfg.model == "/tmp/some/checkpoint" and type(cfg.model) is str
    assert cfg.device == "cpu"
    assert cfg.num_kv_blocks == 64 and type(cfg.num_kv_blocks) is int
    assert cfg.max_num_seqs == 8 and type(cfg.max_num_seqs) is int
    assert cfg.seed == 7 and type(cfg.seed) is int
    assert EngineConfig(device=torch.device("cuda", 1)).device == "cuda:1"
    draft = EngineConfig(speculative_method="draft_model", speculative_model=Path("/d"))
    assert draft.speculative_model == "/d"
    # a byte budget may be a float (it is floored to whole bytes)
    assert EngineConfig(kv_cache_bytes=2.5e6).kv_cache_bytes == 2_500_000


def test_engine_with_valid_config_still_runs():
    from layerzero_serve.engine import Engine
    from layerzero_serve.sampling import SamplingParams

    eng = Engine(
        model="dummy:tiny",
        device="cpu",
        num_kv_blocks=np.int64(64),
        max_num_seqs=4,
        cpu_threads=1,
        seed=-3,
        block_size=8,
        enable_prefix_caching=True,
        enforce_eager=True,
    )
    eng.add_request([1, 2, 3, 4], SamplingParams(max_tokens=3, temperature=0.0), request_id="a")
    got = []
    while eng.has_unfinished():
        for o in eng.step():
            got.extend(o.new_token_ids)
    assert len(got) == 3
    assert eng.kv_manager.num_blocks == 64


# ---- cpu_threads (runner) ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [True, False, 0, -1, 1.5, "2", 30000, 100000, BIG])
def test_choose_cpu_threads_rejects_bad_counts(bad):
    before = torch.get_num_threads()
    with pytest.raises(ValidationError, match="cpu_threads"):
        choose_cpu_threads(64, bad)
    assert torch.get_num_threads() == before  # nothing was set


def test_choose_cpu_threads_keeps_valid_counts():
    before = torch.get_num_threads()
    try:
        assert choose_cpu_threads(64, 1) == 1
        assert torch.get_num_threads() == 1
        assert choose_cpu_threads(64, np.int64(2)) == 2
    finally:
        torch.set_num_threads(before)
    assert MAX_CPU_THREADS >= 256


# ---- SchedulerConfig ---------------------------------------------------------------------------

SCHED_BAD = [
    ("max_num_seqs", True),
    ("max_num_seqs", 1.5),
    ("max_num_seqs", "x"),
    ("max_num_seqs", 0),
    ("max_num_seqs", BIG),
    ("max_num_batched_tokens", True),
    ("max_num_batched_tokens", None),
    ("max_num_batched_tokens", 2**31),
    ("max_model_len", BIG),
    ("max_model_len", 2**31),
    ("max_model_len", True),
    ("max_model_len", 4096.0),
    ("max_model_len", 1),
    ("max_prefill_chunk", True),
    ("max_prefill_chunk", -1),
    ("max_prefill_chunk", BIG),
    ("num_lookahead_tokens", True),
    ("num_lookahead_tokens", -1),
    ("num_lookahead_tokens", BIG),
    ("enable_chunked_prefill", 1),
    ("enable_chunked_prefill", None),
    ("policy", ["fcfs"]),
    ("policy", None),
]


@pytest.mark.parametrize(("field", "value"), SCHED_BAD)
def test_scheduler_config_rejects_bad_values(field, value):
    with pytest.raises(ValidationError, match=field) as ei:
        SchedulerConfig(**{field: value})
    assert ei.value.param == field


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_num_seqs": 1, "max_num_batched_tokens": 1, "max_model_len": 2},
        {"max_model_len": 2**31 - 1, "max_num_batched_tokens": 2**31 - 1},
        {"enable_chunked_prefill": False, "max_num_batched_tokens": 4096},
        {"max_prefill_chunk": 64, "policy": "priority", "num_lookahead_tokens": 16},
    ],
)
def test_scheduler_config_keeps_valid_values(kwargs):
    cfg = SchedulerConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == value
