"""The sampling kernel contract on the CPU: counter-based random numbers, the torch kernel's
filters against the float64 reference, the tie rule, clamping, the sort-free path, and how the
sampler picks kernels through the selection engine (a non position-invariant kernel is never
used for a batch with a seeded row; a failing automatic kernel falls back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import kstest
from test_sampling_reference import filtered_probs

from layerzero_serve.kernels.sampling_api import (
    TorchSamplingKernel,
    counter_uniform,
    draw_inverse_cdf,
    draw_unfiltered,
    filter_weights,
)
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.sampling._kernels import select_sampling_kernels
from layerzero_serve.selection import BackendState, Selector, configure, reload_policy

M64 = (1 << 64) - 1


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: on a 2-core VM torch's thread wake-ups cost more than they save."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _uniform_ref(seed: int, offset: int) -> float:
    h = _mix((_mix(seed & M64) + (offset + 1) * 0x9E3779B97F4A7C15) & M64)
    return (h >> 40) / 2**24


def _args(probs, top_k=None, top_p=1.0, min_p=0.0, seed=0):
    b, v = probs.shape
    k = torch.full((b,), v if top_k is None else top_k, dtype=torch.int32)
    return (
        probs,
        k,
        torch.full((b,), top_p),
        torch.full((b,), min_p),
        torch.arange(b, dtype=torch.int64) + seed,
        torch.zeros(b, dtype=torch.int64),
    )


# ---- random numbers --------------------------------------------------------------------------


def test_counter_uniform_matches_python_splitmix():
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 123456789, -987654321]
    offsets = [0, 1, 7, 2**40, 2**62]
    s = torch.tensor([a for a in seeds for _ in offsets])
    o = torch.tensor([b for _ in seeds for b in offsets])
    got = counter_uniform(s, o).tolist()
    assert got == [_uniform_ref(a, b) for a in seeds for b in offsets]


def test_counter_uniform_is_uniform_and_per_row():
    n = 100_000
    seeds = torch.arange(n, dtype=torch.int64) * 7919
    u = counter_uniform(seeds, torch.zeros(n, dtype=torch.int64))
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert kstest(u.double().numpy(), "uniform").pvalue > 1e-3
    steps = counter_uniform(torch.full((n,), 42), torch.arange(n))  # one seed, many offsets
    assert kstest(steps.double().numpy(), "uniform").pvalue > 1e-3
    # a row's value depends on its (seed, offset) only, not on its position
    perm = torch.randperm(n)
    assert torch.equal(counter_uniform(seeds[perm], torch.zeros(n, dtype=torch.int64)), u[perm])


# ---- torch kernel ----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [5, 32, 257, 1000])
def test_filter_weights_match_reference(vocab):
    rng = np.random.default_rng(vocab)
    cases = []
    for _ in range(60):
        kw = {
            "top_k": int(rng.choice([vocab, 1, 3, 10, vocab - 1])),
            "top_p": float(rng.choice([1.0, 0.3, 0.75, 0.95])),
            "min_p": float(rng.choice([0.0, 0.02, 0.3])),
        }
        logits = rng.normal(0, 2.0, vocab)
        try:
            filtered_probs(logits, **kw)  # refuses rounding-ambiguous cuts
        except AssertionError:
            continue
        cases.append((logits, kw))
    assert len(cases) > 20
    probs = torch.softmax(torch.tensor(np.stack([c[0] for c in cases])), -1).float()
    top_k = torch.tensor([c[1]["top_k"] for c in cases], dtype=torch.int32)
    top_p = torch.tensor([c[1]["top_p"] for c in cases], dtype=torch.float32)
    min_p = torch.tensor([c[1]["min_p"] for c in cases], dtype=torch.float32)
    w = filter_weights(probs, top_k, top_p, min_p).double()
    got = (w / w.sum(-1, keepdim=True)).numpy()
    for i, (logits, kw) in enumerate(cases):
        ref = filtered_probs(logits, **kw)
        assert np.array_equal(got[i] > 0, ref > 0), kw
        np.testing.assert_allclose(got[i], ref, atol=1e-6)


def test_ties_at_the_cuts_keep_the_lower_ids_deterministically():
    """The tie rule: tokens rank by descending probability, lower id first among equals; every
    cut (top-k, top-p) is a cut in this ranking, so of tied tokens the lower ids are kept."""
    v = 32
    logits = torch.full((v,), -5.0)
    logits[[20, 9, 3, 7]] = 1.0  # four tied tokens, ~0.24 each
    probs = torch.softmax(logits, -1)[None].repeat(3, 1)
    kernel = TorchSamplingKernel()
    # top-p .5: mass before ids 3, 7, 9 is < .5; id 20 is cut
    w = filter_weights(*_args(probs, top_p=0.5)[:4])
    assert all(set(torch.nonzero(r).flatten().tolist()) == {3, 7, 9} for r in w)
    # top-k 2 among four tied: ids 3 and 7
    w = filter_weights(*_args(probs, top_k=2)[:4])
    assert all(set(torch.nonzero(r).flatten().tolist()) == {3, 7} for r in w)
    draws = {int(t) for s in range(300) for t in kernel.sample(*_args(probs, top_k=2, seed=s))}
    assert draws == {3, 7}


def test_unfiltered_path_is_bitwise_the_filter_path():
    rng = np.random.default_rng(5)
    probs = torch.softmax(torch.tensor(rng.normal(0, 2, (500, 100)), dtype=torch.float32), -1)
    args = list(_args(probs, min_p=0.05, seed=11))
    args[3] = torch.tensor(rng.choice([0.0, 0.05, 0.5], 500), dtype=torch.float32)
    kernel_tokens = TorchSamplingKernel().sample(*args)
    fast = draw_unfiltered(probs, args[3], args[4], args[5])
    assert torch.equal(kernel_tokens, fast)


def test_inverse_cdf_never_draws_zero_weight_and_guards_rounding():
    w = torch.zeros(4, 10)
    w[:, 9] = 1e-30  # the only positive weight is the last one
    w[1, 0] = 1.0
    seeds = torch.arange(4) * 1000
    for off in range(200):
        tok = draw_inverse_cdf(w, seeds, torch.full((4,), off))
        assert tok[0] == 9 and tok[2] == 9 and tok[1] in (0, 9)


# ---- selection -------------------------------------------------------------------------------

OK = BackendState(True, "1.0", "")
CTX = KernelContext(Op.SAMPLING, device_type="cpu", sm=0, generation="cpu", vocab_size=50)


class _FakeKernel:
    """Not position-invariant (like FlashInfer's): records its calls."""

    name = "fake.sampling"
    position_invariant = False

    def __init__(self, ctx=None, fail=False):
        self.calls = 0
        self.fail = fail

    def sample(self, probs, top_k, top_p, min_p, seed, offset):
        self.calls += 1
        if self.fail:
            raise RuntimeError("kernel exploded")
        return probs.argmax(-1)


@pytest.fixture
def _clean_policy():
    configure(reset=True)
    reload_policy()
    yield
    configure(reset=True)
    reload_policy()


def _selector(fake: _FakeKernel) -> Selector:
    from layerzero_serve.kernels._torch_backend import SPECS as TORCH_SPECS

    torch_sampler = next(s for s in TORCH_SPECS if s.op == Op.SAMPLING)
    spec = KernelSpec(
        "fake.sampling",
        Op.SAMPLING,
        "fake",
        priority=100,
        graph_safe=True,
        device_types=frozenset({"cpu", "cuda"}),
        factory=lambda ctx: fake,
    )
    return Selector(specs=[torch_sampler, spec], backends={"torch": OK, "fake": OK})


def test_non_invariant_kernel_gets_an_invariant_partner(_clean_policy):
    fake = _FakeKernel()
    kernel, invariant, locked = select_sampling_kernels(_selector(fake), CTX)
    assert kernel is fake and isinstance(invariant, TorchSamplingKernel) and not locked

    sampler = Sampler(seed=0).bind("cpu", 50, 8, _selector(fake), CTX)
    assert sampler.kernel_name == "fake.sampling"
    logits = torch.randn(3, 50)
    params = [SamplingParams(top_k=5), SamplingParams(top_p=0.9)]
    sampler(logits[:2], params)
    assert fake.calls == 1
    seeded = params + [SamplingParams(top_k=5, seed=1)]
    solo = Sampler().bind("cpu", 50)(logits[2:], seeded[2:]).tokens
    got = sampler(logits, seeded).tokens  # a seeded row: the invariant (torch) kernel
    assert fake.calls == 1 and got[2] == solo[0]


def test_failing_automatic_kernel_falls_back(_clean_policy):
    fake = _FakeKernel(fail=True)
    sel = _selector(fake)
    sampler = Sampler().bind("cpu", 50, 8, sel, CTX)
    out = sampler(torch.randn(4, 50), SamplingParams(top_k=3))
    assert len(out.tokens) == 4 and fake.calls == 1
    assert sampler.kernel_name == "torch.sampler" and "fake" in sel.unhealthy()


def test_forced_kernel_failure_raises():
    sampler = Sampler(kernel=_FakeKernel(fail=True))
    with pytest.raises(RuntimeError):
        sampler(torch.randn(2, 50), SamplingParams(top_k=3))
