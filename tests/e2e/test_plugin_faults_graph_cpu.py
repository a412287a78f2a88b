"""The CUDA-graph runner's fault path on the CPU, with torch.cuda's graph API replaced by an
eager stand-in (a "graph" replays by running its bucket's dispatch on the static buffers): a
decode plug-in whose host ``plan()`` raises at capture, or before a replay, is replaced by the
next candidate (backend marked unhealthy, bucket re-captured) and greedy tokens equal an eager
engine's without the plug-in; a locked one re-raises. The real graphs are covered on the GPU
by test_plugin_faults_graphs.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from layerzero_serve.engine import Engine
from layerzero_serve.kernels._torch_backend import TorchPagedAttention
from layerzero_serve.kernels.spec import KernelSpec, Op
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.selection import (
    configure,
    get_selector,
    register_backend,
    register_kernel,
    reload_policy,
    set_selector,
)

PROMPTS = [[5 + i] * (3 + 2 * i) for i in range(5)]
BUCKETS = [1, 2, 4, 8]


class FakeGraph:
    """Eager stand-in for ``torch.cuda.CUDAGraph``: ``replay`` runs the bucket it belongs to."""

    graph_runner = None  # the DecodeGraphRunner under test
    replays = 0

    def replay(self) -> None:
        g = FakeGraph.graph_runner
        cap = next(c for c in g.graphs.values() if c.graph is self)
        d = cap.dispatch
        meta = d._planned if d._planned is not None else cap.meta
        n = cap.batch * g.q_len
        hidden = g.model(g.input_ids[:n], g.positions[:n], d, meta)
        cap.logits.copy_(g.model.compute_logits(hidden))
        FakeGraph.replays += 1

    def reset(self) -> None:
        self.dead = True


@pytest.fixture(autouse=True)
def _fake_cuda_graphs(monkeypatch):
    set_selector(None)
    configure(reset=True)
    reload_policy()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    zeros = torch.zeros

    def no_pin_zeros(*args, pin_memory=False, **kwargs):
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", no_pin_zeros)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda *a, **k: contextlib.nullcontext())
    FakeGraph.replays = 0
    yield
    set_selector(None)
    configure(reset=True)
    torch.set_num_threads(n)


def _generate(graphs: bool) -> tuple[list[list[int]], Engine]:
    eng = Engine(model="dummy:tiny", device="cpu", max_num_seqs=8, async_scheduling=False)
    if graphs:
        eng.runner.enable_graphs(BUCKETS, 256, progress=False)
        eng.runner.sampler_graphs = None  # sample eagerly (the stand-in records no sampler)
        FakeGraph.graph_runner = eng.runner.graphs
    params = [
        SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True)
        for i in range(len(PROMPTS))
    ]
    ids = [eng.add_request(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.finish_reason != "error", o
            got[o.request_id].extend(o.new_token_ids)
    return [got[i] for i in ids], eng


class _PlanFails(TorchPagedAttention):
    """plan raises from the ``fail_from + 1``-th call of each instance."""

    fail_from = 1

    def __init__(self, ctx):
        super().__init__(ctx)
        self.plans = 0

    def plan(self, meta):
        self.plans += 1
        if self.plans > self.fail_from:
            raise RuntimeError("injected plan fault")
        super().plan(meta)


def _register(fail_from: int) -> None:
    cls = type("PlanFails", (_PlanFails,), {"fail_from": fail_from})
    register_backend("planfail")
    register_kernel(
        KernelSpec("planfail.decode", Op.ATTN_DECODE, "planfail", priority=1000,
                   graph_safe=True, device_types=frozenset({"cpu", "cuda"}), factory=cls)
    )  # fmt: skip


def test_the_stand_in_replays_like_eager():
    expected, _ = _generate(graphs=False)
    got, _ = _generate(graphs=True)
    assert got == expected and FakeGraph.replays > 0


@pytest.mark.parametrize("fail_from", [0, 1])
def test_plan_fault_at_capture_or_replay_recaptures_with_the_next_kernel(fail_from):
    expected, _ = _generate(graphs=False)
    _register(fail_from)
    got, eng = _generate(graphs=True)
    assert got == expected and FakeGraph.replays > 0
    assert "planfail" in get_selector().unhealthy()
    names = {c.batch: c.dispatch.decode.choice.name for c in eng.runner.graphs.graphs.values()}
    assert sorted(names) == BUCKETS
    if fail_from == 0:  # every bucket fell back while capturing
        assert "planfail.decode" not in names.values()
    else:  # bucket 8 (5 requests) was replayed first: re-captured with another kernel
        assert names[8] != "planfail.decode"


def test_locked_kernel_plan_fault_at_replay_reraises():
    _register(1)
    configure(lock={"attention_decode": "planfail.decode"})
    with pytest.raises(RuntimeError, match="injected plan fault"):
        _generate(graphs=True)
