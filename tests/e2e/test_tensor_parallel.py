"""Tensor parallelism on the CPU (gloo): an engine sharded over 2 or 3 ranks gives the tokens of
the unsharded engine (float32, greedy and seeded sampling) for the tiny checkpoints of the HF
parity tests, read slice by slice from safetensors; speculation, prefix hits and preemption
under TP; a worker killed mid-run; bad sizes. Each sharded engine starts worker interpreters
(a few seconds each), so the cases share engines where they can."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from hf_checkpoints import make_checkpoint, randomize

from layerzero_serve import Engine, SamplingParams
from layerzero_serve.distributed import TensorParallelError
from layerzero_serve.distributed.step_mirror import TensorParallelWorkerError
from layerzero_serve.errors import ValidationError

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 99, 42, 7, 7, 7, 7], [250, 1, 2, 3, 4, 5], [8] * 21, [300, 301, 302]]


def _params(i: int) -> SamplingParams:
    """Greedy for even prompts, seeded top-p / top-k sampling for odd ones."""
    if i % 2 == 0:
        return SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=1234 + i,
                          ignore_eos=True)  # fmt: skip


def _run(model, prompts=PROMPTS, params=_params, **cfg) -> tuple[dict, dict]:
    """Tokens per request and the engine's stats (the engine is closed on return)."""
    cfg = {"num_kv_blocks": 64, "block_size": 4, "max_num_seqs": 8, **cfg}
    with Engine(model=str(model), **cfg) as eng:
        ids = [eng.add_request(p, params(i)) for i, p in enumerate(prompts)]
        assert ids
        got: dict[str, list[int]] = {}
        while eng.has_unfinished():
            for o in eng.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        stats = {
            "preemptions": eng.scheduler.num_preemptions,
            "prefix_hits": eng.kv_manager.stats.hits,
            "spec": eng.stats().get("speculative"),
        }
    return got, stats


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp_ckpt")
    names = ["llama-mha-untied-bias", "llama-gqa-tied", "mistral", "qwen2-bias", "qwen3-qknorm",
             "llama-sharded"]  # fmt: skip
    return {n: make_checkpoint(n, root / n)[0] for n in names}


@pytest.mark.parametrize(
    "name",
    [
        "llama-mha-untied-bias",
        "llama-gqa-tied",
        "mistral",
        "qwen2-bias",
        "qwen3-qknorm",
        "llama-sharded",
    ],  # fmt: skip
)
def test_tp2_tokens_equal_tp1(checkpoints, name):
    ref, _ = _run(checkpoints[name])
    got, _ = _run(checkpoints[name], tensor_parallel_size=2)
    assert got == ref
    assert all(len(t) == 10 for t in got.values())


def _six_heads_one_kv(path):
    """Qwen2 (q/k/v biases) with 6 query heads and 1 KV head, vocabulary 385 (not a multiple
    of 3: the vocabulary-parallel pieces are padded)."""
    torch.manual_seed(7)
    cfg = transformers.Qwen2Config(
        vocab_size=385, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=1, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize(hf)
    hf.save_pretrained(path)
    return path


def test_tp3_replicates_the_single_kv_head(tmp_path):
    path = _six_heads_one_kv(tmp_path / "q6kv1")
    ref, _ = _run(path)
    got, _ = _run(path, tensor_parallel_size=3)
    assert got == ref


def test_speculation_prefix_hits_and_preemption_under_tp(checkpoints):
    """n-gram drafts verified on the sharded model, a KV pool small enough to preempt, and
    repeated prompts (prefix-cache hits): the tokens of the plain unsharded engine."""
    path = checkpoints["llama-gqa-tied"]
    prompts = [[5, 6, 7, 8] * 5, [9, 10, 11] * 6, [5, 6, 7, 8] * 5, [1, 2] * 9]
    kw = {"num_kv_blocks": 18, "max_num_batched_tokens": 64, "max_prefill_chunk": 7}
    ref, _ = _run(path, prompts, **kw)
    got, stats = _run(path, prompts, tensor_parallel_size=2, speculative_method="ngram",
                      num_speculative_tokens=3, adaptive_speculation=False, **kw)  # fmt: skip
    assert got == ref
    assert stats["preemptions"] > 0 and stats["prefix_hits"] > 0
    assert stats["spec"]["drafted_tokens"] > 0


def test_n_samples_under_tp(checkpoints):
    """n > 1 seeded siblings: the unsharded engine's tokens."""
    path = checkpoints["qwen2-bias"]

    def params(i):
        return SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=99 + i, ignore_eos=True)

    ref, _ = _run(path, [[3, 4, 5, 6, 7, 8, 9]], params)
    got, _ = _run(path, [[3, 4, 5, 6, 7, 8, 9]], params, tensor_parallel_size=2)
    assert got == ref and len(got) == 3


_TORCHRUN_SCRIPT = """
import json, sys
from layerzero_serve import Engine, SamplingParams
eng = Engine(model=sys.argv[1], tensor_parallel_size=2, num_kv_blocks=64, block_size=4)
if eng.is_driver:  # rank 0 drives; rank 1's Engine() returns once rank 0 closes
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request(p, sp) for p in json.loads(sys.argv[2])]
    got = {}
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    eng.close()
    with open("result.json", "w") as f:  # files, not stdout: the ranks' prints interleave
        json.dump([got[i] for i in ids], f)
else:
    try:
        eng.step()
    except RuntimeError as e:
        assert "rank 1" in str(e), e
        open("worker-done", "w").close()
"""


def test_torchrun_ranks(checkpoints, tmp_path):
    """One process per rank under torchrun: rank 0 drives, rank 1 serves its steps and its
    Engine returns when rank 0 closes; the tokens equal the unsharded engine's."""
    import json
    import subprocess
    import sys

    from layerzero_serve.distributed import free_port

    path = str(checkpoints["mistral"])
    prompts = PROMPTS[:2]
    ref, _ = _run(path, prompts, lambda i: SamplingParams(max_tokens=10, temperature=0.0,
                                                          ignore_eos=True))  # fmt: skip
    script = tmp_path / "tp_script.py"
    script.write_text(_TORCHRUN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(free_port()), str(script), path, json.dumps(prompts)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text()) == list(ref.values())
    assert (tmp_path / "worker-done").exists()


def test_draft_model_speculation_under_tp(checkpoints):
    """The draft model runs whole on rank 0; the target is sharded: greedy tokens unchanged."""
    path = str(checkpoints["llama-gqa-tied"])
    ref, _ = _run(path, PROMPTS[:2], lambda i: _params(0))
    got, stats = _run(path, PROMPTS[:2], lambda i: _params(0), tensor_parallel_size=2,
                      speculative_method="draft_model", speculative_model=path,
                      num_speculative_tokens=3, adaptive_speculation=False)  # fmt: skip
    assert got == ref
    assert stats["spec"]["accepted_tokens"] > 0


def test_killed_worker_fails_the_next_step_and_leaves_no_process(checkpoints):
    eng = Engine(model=str(checkpoints["llama-gqa-tied"]), tensor_parallel_size=2,
                 num_kv_blocks=32, block_size=4, distributed_timeout_s=20)  # fmt: skip
    eng.add_request([1, 2, 3, 4], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    procs = eng._tp.workers.procs
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait(10)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelWorkerError, match="rank 1"):
        for _ in range(5):
            eng.step()
    assert time.monotonic() - t0 < 20
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(TensorParallelWorkerError):  # the engine stays failed
        eng.step()
    eng.close()  # idempotent after the failure


def test_ranks_with_different_kernels_fail_at_start(checkpoints, monkeypatch):
    """Rank 0 reports another prefill kernel than rank 1: start-up fails naming the op, and
    no worker is left running."""
    from layerzero_serve.distributed.workers import PlanMismatchError
    from layerzero_serve.runner import ModelRunner

    real = ModelRunner.plan_fingerprint
    monkeypatch.setattr(
        ModelRunner, "plan_fingerprint", lambda self: {**real(self), "eager.prefill": "other"}
    )
    before = set(_children())
    with pytest.raises(PlanMismatchError, match="eager.prefill"):
        Engine(model=str(checkpoints["llama-gqa-tied"]), tensor_parallel_size=2,
               num_kv_blocks=16)  # fmt: skip
    assert not set(_children()) - before


def _children() -> list[int]:
    """Live child processes of this one (Linux)."""
    me = str(os.getpid())
    kids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.append(int(pid))
    return kids


def test_close_ends_the_workers(checkpoints):
    eng = Engine(model=str(checkpoints["llama-gqa-tied"]), tensor_parallel_size=2,
                 num_kv_blocks=16)  # fmt: skip
    procs = list(eng._tp.workers.procs)
    eng.close()
    assert all(p.poll() == 0 for p in procs)
    eng.close()


@pytest.mark.parametrize("size", [3, 0, -2, "2", 2.0, True, None])
def test_bad_tensor_parallel_size(size):
    """3 does not divide 4 heads; the others are not ints >= 1: a ValidationError naming the
    field, before any process starts."""
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        Engine(model="dummy:tiny", tensor_parallel_size=size)


def test_size_not_splitting_the_heads_says_which(checkpoints):
    with pytest.raises(TensorParallelError, match="attention heads") as e:
        Engine(model=str(checkpoints["qwen3-qknorm"]), tensor_parallel_size=3)
    assert e.value.param == "tensor_parallel_size" and "[1, 2, 4]" in e.value.allowed


def test_size_above_the_device_count(monkeypatch, tmp_path):
    """On the CPU a host gives 4 gloo ranks per core: 6 ranks on one core are refused."""
    path = _six_heads_one_kv(tmp_path / "q6kv1")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.raises(TensorParallelError, match="at most 4"):
        Engine(model=str(path), tensor_parallel_size=6, device="cpu")


@pytest.mark.parametrize("timeout", [0, 0.5, -1, float("nan"), "5", True, 10**6])
def test_bad_distributed_timeout(timeout):
    with pytest.raises(ValidationError, match="distributed_timeout_s"):
        Engine(model="dummy:tiny", distributed_timeout_s=timeout)


def test_numpy_timeout_is_stored_as_float():
    from layerzero_serve.config import EngineConfig

    cfg = EngineConfig(model="dummy:tiny", distributed_timeout_s=np.int64(30))
    assert type(cfg.distributed_timeout_s) is float and cfg.distributed_timeout_s == 30.0


def _tiny_tp(**kw) -> Engine:
    return Engine(model="dummy:tiny", device="cpu", tensor_parallel_size=2, num_kv_blocks=32,
                  **kw)  # fmt: skip


def _one_step(eng) -> None:
    eng.add_request([1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True))
    eng.step()


def test_hung_worker_fails_the_step_within_the_timeout():
    eng = _tiny_tp(distributed_timeout_s=3)
    _one_step(eng)
    procs = eng._tp.workers.procs
    os.kill(procs[0].pid, signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelWorkerError):
        for _ in range(3):
            eng.step()
    assert time.monotonic() - t0 < 30
    assert all(p.poll() is not None for p in procs)


def test_rank0_failure_mid_step_tears_the_group_down(monkeypatch):
    """An exception on rank 0 after the workers got the step: raised at once as a
    TensorParallelWorkerError, the workers end (no wait for a collective timeout)."""
    eng = _tiny_tp(distributed_timeout_s=60)
    _one_step(eng)
    layer = eng.runner.model.model.layers[1]

    def boom(*_):
        raise RuntimeError("injected")

    handle = layer.register_forward_pre_hook(boom)
    t0 = time.monotonic()
    with pytest.raises(TensorParallelWorkerError, match="injected"):
        eng.step()
    handle.remove()
    assert time.monotonic() - t0 < 30
    procs = eng._tp.workers.procs
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(TensorParallelWorkerError):
        eng.step()


def test_ctrl_c_reaches_rank_0_only():
    with _tiny_tp() as eng:
        _one_step(eng)
        os.kill(eng._tp.workers.procs[0].pid, signal.SIGINT)
        time.sleep(0.5)
        eng.step()  # the worker ignored it
        assert eng._tp.workers.procs[0].poll() is None


def test_worker_dying_before_the_rendezvous_is_seen_at_once(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "executable", "/bin/false")
    t0 = time.monotonic()
    with pytest.raises(TensorParallelWorkerError, match="exited with code 1"):
        _tiny_tp(distributed_timeout_s=120)
    assert time.monotonic() - t0 < 30


def test_second_open_tp_engine_is_refused_and_one_rank_engines_still_work():
    with _tiny_tp() as eng:
        with pytest.raises(RuntimeError, match="still open"):
            _tiny_tp()
        plain = Engine(model="dummy:tiny", device="cpu", num_kv_blocks=16)
        assert plain._tp is None
        _one_step(eng)
    with _tiny_tp() as again:  # once closed, a new one starts
        _one_step(again)


def test_closed_engine_refuses_requests_and_steps():
    eng = _tiny_tp()
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.add_request([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="closed"):
        eng.step()
