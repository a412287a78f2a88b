"""The per-plan kernel choice's sampler side (the sampler graphs time the candidates on the
GPU): which kernels may draw a plan, drawing with a chosen one, and blame when the chosen one
raises or returns ids outside the vocabulary (its own backend, not the default's)."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.kernels.sampling_api import TorchSamplingKernel
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.sampling._rows import CallRow
from layerzero_serve.selection import BackendState, Selector, configure, reload_policy

V = 50
OK = BackendState(True, "1.0", "")
CTX = KernelContext(Op.SAMPLING, device_type="cpu", sm=0, generation="cpu", vocab_size=V)


@pytest.fixture(autouse=True)
def _clean_policy():
    configure(reset=True)
    reload_policy()
    yield
    configure(reset=True)
    reload_policy()


class _Kernel:
    """A plug-in that draws the torch kernel's tokens, or misbehaves as told."""

    def __init__(self, name: str, invariant: bool, behaviour: str = "good") -> None:
        self.name, self.position_invariant, self.behaviour = name, invariant, behaviour
        self.calls = 0

    def sample(self, probs, top_k, top_p, min_p, seed, offset):
        self.calls += 1
        if self.behaviour == "raise":
            raise RuntimeError(f"{self.name} exploded")
        good = TorchSamplingKernel().sample(probs, top_k, top_p, min_p, seed, offset)
        if self.behaviour == "out_of_vocab":
            return torch.full_like(good, V + 7)
        return good


def _spec(kernel: _Kernel, backend: str, priority: int) -> KernelSpec:
    devices = frozenset({"cpu", "cuda"})
    return KernelSpec(f"{backend}.k", Op.SAMPLING, backend, priority=priority, graph_safe=True,
                      device_types=devices, factory=lambda ctx: kernel)  # fmt: skip


def _setup(fast: _Kernel, other: _Kernel):
    from layerzero_serve.kernels._torch_backend import SPECS as TORCH_SPECS

    torch_spec = next(s for s in TORCH_SPECS if s.op == Op.SAMPLING)
    sel = Selector(specs=[torch_spec, _spec(fast, "fast", 100), _spec(other, "other", 50)],
                   backends={"torch": OK, "fast": OK, "other": OK})  # fmt: skip
    return sel, Sampler(seed=0).bind("cpu", V, 8, sel, CTX)


def _batch(sampler: Sampler, seeded: bool):
    rows = []
    for i in range(4):  # seeded rows get new request ids: the sampler keeps a row's state
        params = SamplingParams(temperature=0.9, top_p=0.8, seed=7 + i if seeded else None)
        rows.append(CallRow(i + 100 * seeded, params, [1, 2], [1, 2, 3]))
    return rows, sampler.prepare(rows)


def _logits() -> torch.Tensor:
    return torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3


def test_candidates_put_the_default_first_and_seeded_plans_keep_their_kernel():
    fast, other = _Kernel("fast_k", True), _Kernel("other_k", False)
    _, sampler = _setup(fast, other)
    _, unseeded = _batch(sampler, False)
    names = [k.name for k in sampler.kernel_candidates(unseeded.plan)]
    assert names == ["fast_k", "other_k", "torch.sampler"]
    _, seeded = _batch(sampler, True)
    names = [k.name for k in sampler.kernel_candidates(seeded.plan)]
    assert names == ["fast_k"]  # a seed gives the same tokens on every run: no timed choice


def test_a_forced_kernel_is_the_only_candidate():
    sampler = Sampler(seed=0, kernel=TorchSamplingKernel()).bind("cpu", V)
    _, batch = _batch(sampler, False)
    assert [k.name for k in sampler.kernel_candidates(batch.plan)] == ["torch.sampler"]


def test_drawing_with_a_chosen_candidate_uses_it_and_draws_the_same_tokens():
    fast, other = _Kernel("fast_k", True), _Kernel("other_k", True)
    _, sampler = _setup(fast, other)
    logits = _logits()
    rows, batch = _batch(sampler, False)
    ref = sampler.sample(logits, batch).to_host()
    assert ref.drawn_by is fast and fast.calls == 1
    rows, batch = _batch(sampler, False)  # the same rows: the same seeds and offsets
    chosen = sampler.kernel_candidates(batch.plan)[1]
    got = sampler.sample(logits, batch, chosen).to_host()
    assert got.drawn_by is chosen is other and other.calls == 1 and fast.calls == 1
    assert got.tokens == ref.tokens


def test_a_chosen_candidate_that_raises_is_blamed_and_the_default_draws():
    fast, other = _Kernel("fast_k", False), _Kernel("other_k", False, "raise")
    sel, sampler = _setup(fast, other)
    rows, batch = _batch(sampler, False)
    got = sampler.sample(_logits(), batch, other).to_host()
    assert other.calls == 1 and got.drawn_by is fast and not got.failed
    assert set(sel.unhealthy()) == {"other"}  # its own backend, not the default's
    assert [k.name for k in sampler.kernel_candidates(batch.plan)] == ["fast_k", "torch.sampler"]


def test_out_of_vocabulary_ids_are_blamed_on_the_kernel_that_drew_them():
    fast, other = _Kernel("fast_k", False), _Kernel("other_k", False, "out_of_vocab")
    sel, sampler = _setup(fast, other)
    logits = _logits()
    rows, batch = _batch(sampler, False)
    res = sampler.sample(logits, batch, other).to_host()
    assert res.drawn_by is other and len(res.failed) == 4
    again = sampler.redraw(logits, res, rows)
    assert set(sel.unhealthy()) == {"other"}
    assert not again.failed and again.drawn_by is fast
    assert all(0 <= t < V for t in again.tokens)
