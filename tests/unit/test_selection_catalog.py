"""The real kernel catalog on fake devices (H100, A100, RTX 4090, B200, T4, CPU) and fake
availability sets: exactly which kernel wins each plan, and the reason each loser gives."""

from __future__ import annotations

import pytest

from layerzero_serve.kernels._catalog import all_specs
from layerzero_serve.kernels.spec import Op, Reason
from layerzero_serve.selection import (
    FAKE_DEVICES,
    BackendState,
    ModelShape,
    Selector,
    configure,
    model_plans,
    reload_policy,
)
from layerzero_serve.selection.plans import base_context, batch_buckets

ALL = ("torch", "triton", "flashinfer", "flash_attn", "xformers", "liger_kernel")
LLAMA_BF16 = ModelShape("bfloat16", 128, 32, 8, 128256)
LLAMA_FP32 = ModelShape("float32", 128, 32, 8, 128256)
ODD_HEAD = ModelShape("bfloat16", 80, 32, 8, 32000)


@pytest.fixture(autouse=True)
def _no_policy(monkeypatch):
    monkeypatch.delenv("LZ_KERNEL_POLICY", raising=False)
    monkeypatch.delenv("LZ_KERNEL_POLICY_FILE", raising=False)
    configure(reset=True)
    reload_policy()


def _selector(available=ALL):
    avail = {
        b: BackendState(b in available, "x", "" if b in available else "not installed") for b in ALL
    }
    return Selector(specs=all_specs(), backends=avail)


def _choose(sel, device, shape, op, batch=8, graph=True, q_len=1):
    ctx = base_context(
        op,
        device=FAKE_DEVICES[device],
        shape=shape,
        block_size=16,
        batch_bucket=batch,
        q_len=q_len,
        graph_mode=graph,
    )
    ch = sel.select(op, ctx)
    return ch.name, {c.name: (c.rejection.code if c.rejection else None) for c in ch.candidates}


def test_every_spec_is_well_formed():
    specs = all_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    assert {s.backend for s in specs} <= set(ALL)
    for s in specs:
        assert s.name.split(".")[0] in s.backend or s.backend.startswith(s.name.split(".")[0])
    ops = {s.op for s in specs}
    assert {Op.ATTN_DECODE, Op.ATTN_PREFILL, Op.KV_WRITE, Op.SAMPLING} <= ops
    torch_ops = {s.op for s in specs if s.backend == "torch"}
    assert torch_ops == set(Op)  # the torch reference covers every op


@pytest.mark.parametrize(
    "device,decode,prefill",
    [
        ("h100", "flash_attn.fa3_decode", "flash_attn.fa3_prefill"),
        ("b200", "flash_attn.fa4_decode", "flash_attn.fa4_prefill"),
        ("a100", "triton.paged_decode", "flashinfer.prefill"),  # no per-step host plan
        ("rtx4090", "triton.paged_decode", "flashinfer.prefill"),
    ],
)
def test_winners_with_every_backend_installed(device, decode, prefill):
    sel = _selector()
    name, why = _choose(sel, device, LLAMA_BF16, Op.ATTN_DECODE)
    assert name == decode
    assert why["torch.paged_decode"] is None  # runnable, lower score
    assert why["flash_attn.fa2_decode"] == Reason.BLOCK_SIZE  # FA2 paged needs 256-token pages
    if device in ("a100", "rtx4090"):
        assert why["flash_attn.fa3_decode"] == Reason.SM_TOO_OLD
    if device == "b200":
        assert why["flash_attn.fa3_decode"] == Reason.GENERATION
    assert why["xformers.decode"] == Reason.NOT_GRAPH_SAFE  # the plan is graph mode
    name, why = _choose(sel, device, LLAMA_BF16, Op.ATTN_PREFILL, graph=False, q_len=0)
    assert name == prefill


@pytest.mark.parametrize("device", ["h100", "a100", "rtx4090", "b200"])
def test_triton_decode_and_flashinfer_prefill_win_without_flash_attention(device):
    sel = _selector(("torch", "triton", "flashinfer", "liger_kernel"))
    for graph in (False, True):  # the same decode kernel with graphs on and off
        name, why = _choose(sel, device, LLAMA_BF16, Op.ATTN_DECODE, graph=graph)
        assert name == "triton.paged_decode"
        assert why["flashinfer.decode"] is None  # runnable, lower score
    assert why["flash_attn.fa3_decode"] in (Reason.BACKEND_UNAVAILABLE,)
    assert why["xformers.decode"] == Reason.BACKEND_UNAVAILABLE
    name, _ = _choose(sel, device, LLAMA_BF16, Op.ATTN_PREFILL, graph=False, q_len=0)
    assert name == "flashinfer.prefill"


def test_layer_op_kernels_on_gpu_only():
    sel = _selector()
    name, why = _choose(sel, "h100", LLAMA_BF16, Op.RMSNORM, q_len=0)
    assert name == "triton.rmsnorm"  # fuses the residual add as well
    assert why["liger.rmsnorm"] is None  # runnable, lower score
    assert _choose(sel, "h100", LLAMA_BF16, Op.SWIGLU, q_len=0)[0] == "liger.swiglu"
    name, why = _choose(sel, "h100", LLAMA_BF16, Op.ROPE, q_len=0)
    assert name == "triton.rope" and why["liger.rope"] is None  # runnable, lower priority
    for op in (Op.RMSNORM, Op.ROPE, Op.SWIGLU):
        name, why = _choose(sel, "cpu", LLAMA_FP32, op, graph=False, q_len=0)
        assert name.startswith("torch.") and why[f"liger.{op.value}"] == Reason.DEVICE_TYPE


def test_turing_keeps_flashinfer_decode_but_not_prefill():
    sel = _selector()
    assert _choose(sel, "t4", LLAMA_BF16, Op.ATTN_DECODE)[0] == "flashinfer.decode"
    name, why = _choose(sel, "t4", LLAMA_BF16, Op.ATTN_PREFILL, graph=False, q_len=0)
    assert name == "torch.paged_prefill"
    assert why["flashinfer.prefill"] == Reason.SM_TOO_OLD


def test_fp32_and_odd_head_dims_fall_back_with_reasons():
    sel = _selector()
    name, why = _choose(sel, "h100", LLAMA_FP32, Op.ATTN_DECODE)
    assert name != "flashinfer.decode" and why["flashinfer.decode"] == Reason.DTYPE
    name, why = _choose(sel, "h100", ODD_HEAD, Op.ATTN_DECODE)
    assert why["flashinfer.decode"] == Reason.HEAD_DIM


def test_cpu_gets_torch_everywhere_and_gpu_kernels_say_device_type():
    sel = _selector()
    for op, q, graph in ((Op.ATTN_DECODE, 1, False), (Op.ATTN_PREFILL, 0, False)):
        name, why = _choose(sel, "cpu", LLAMA_FP32, op, graph=graph, q_len=q)
        assert name.startswith("torch.")
        assert all(
            code == Reason.DEVICE_TYPE for n, code in why.items() if not n.startswith("torch.")
        )


def test_availability_sets():
    only_torch = _selector(("torch",))
    name, why = _choose(only_torch, "h100", LLAMA_BF16, Op.ATTN_DECODE)
    assert name == "torch.paged_decode"
    assert why["flashinfer.decode"] == Reason.BACKEND_UNAVAILABLE


def test_graph_mode_excludes_host_looping_prefill():
    sel = _selector(("torch",))
    ctx = base_context(
        Op.ATTN_PREFILL,
        device=FAKE_DEVICES["h100"],
        shape=LLAMA_BF16,
        block_size=16,
        batch_bucket=8,
        q_len=0,
        graph_mode=True,
    )
    with pytest.raises(ValueError) as ei:
        sel.select(Op.ATTN_PREFILL, ctx)
    assert "not_graph_safe" in str(ei.value)


def test_model_plans_one_decision_each():
    sel = _selector()
    plans = model_plans(FAKE_DEVICES["h100"], LLAMA_BF16, 16, 256, batch_buckets(256))
    decode = [p for p in plans if p.op == Op.ATTN_DECODE]
    assert [p.batch_bucket for p in decode] == [1, 2, 4, 8] + list(range(16, 257, 8))
    for p in plans:
        sel.select(p.op, p)
    assert sel.stats.cold_selections == len(set(plans))


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError):
        batch_buckets(0)
