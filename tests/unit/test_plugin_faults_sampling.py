"""Faulty sampling plug-ins (registered through the selection engine, or forced) never break the
sampler for the other rows: a kernel that raises, returns junk (wrong shape, dtype, not a
tensor, ids outside the vocabulary) or is built by a factory that raises or returns junk falls
back to the next candidate, the backend of its ``KernelSpec`` is marked unhealthy, and every
row gets the tokens the torch kernel gives (seeded rows: bitwise the same). ``Sampler(kernel=)``
validates what it is given."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.sampling_api import TorchSamplingKernel
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.sampling import Sampler, SamplingParams
from layerzero_serve.sampling import _kernels as kernels_mod
from layerzero_serve.selection import BackendState, Selector, configure, reload_policy

V = 50
OK = BackendState(True, "1.0", "")
CTX = KernelContext(Op.SAMPLING, device_type="cpu", sm=0, generation="cpu", vocab_size=V)
PARAMS = [
    SamplingParams(temperature=0.8, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.7, min_p=0.05),
    SamplingParams(temperature=0.0),
]
SEEDS = [11, 22, 33, 44]


@pytest.fixture(autouse=True)
def _clean_policy():
    configure(reset=True)
    reload_policy()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    configure(reset=True)
    reload_policy()
    torch.set_num_threads(n)


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(PARAMS), V, generator=torch.Generator().manual_seed(seed)) * 3


def _reference(logits: torch.Tensor) -> list[int]:
    """The torch kernel's tokens for the same rows and seeds (no plug-in anywhere)."""
    return Sampler(seed=0).bind("cpu", V)(logits, PARAMS, seeds=SEEDS).tokens


class _Plugin:
    """A position-invariant plug-in whose name does not start with its backend's name."""

    name = "custom_sampler"
    position_invariant = True

    def __init__(self, behaviour: str = "raise") -> None:
        self.behaviour = behaviour
        self.calls = 0

    def sample(self, probs, top_k, top_p, min_p, seed, offset):
        self.calls += 1
        b = probs.shape[0]
        good = TorchSamplingKernel().sample(probs, top_k, top_p, min_p, seed, offset)
        junk = {
            "raise": None,
            "shape_2d": lambda: good[:, None],
            "shape_long": lambda: torch.cat([good, good[:1]]),
            "float": lambda: good.float(),
            "bool": lambda: good > 0,
            "none": lambda: None,
            "list": lambda: good.tolist(),
            "too_big": lambda: torch.where(torch.arange(b) == 0, V + 3, good),
            "negative": lambda: torch.where(torch.arange(b) == 1, -1, good),
        }[self.behaviour]
        if junk is None:
            raise RuntimeError("plug-in exploded")
        return junk()


def _selector(kernel, backend: str = "mybackend", factory=None) -> Selector:
    from layerzero_serve.kernels._torch_backend import SPECS as TORCH_SPECS

    torch_sampler = next(s for s in TORCH_SPECS if s.op == Op.SAMPLING)
    spec = KernelSpec(
        "mybackend.custom",
        Op.SAMPLING,
        backend,
        priority=100,
        graph_safe=True,
        device_types=frozenset({"cpu", "cuda"}),
        factory=factory or (lambda ctx: kernel),
    )
    return Selector(specs=[torch_sampler, spec], backends={"torch": OK, backend: OK})


# ---- Sampler(kernel=...) validation --------------------------------------------------------


@pytest.mark.parametrize("bad", ["x", 42, object(), TorchSamplingKernel])
def test_sampler_kernel_argument_is_validated(bad):
    with pytest.raises(ValidationError) as info:
        Sampler(kernel=bad)
    assert isinstance(info.value, ValueError)
    assert info.value.param == "kernel"
    assert "sample" in info.value.allowed and "position_invariant" in info.value.allowed


def test_a_valid_forced_kernel_is_accepted():
    sampler = Sampler(kernel=TorchSamplingKernel())
    logits = _logits()
    assert sampler(logits, PARAMS, seeds=SEEDS).tokens == _reference(logits)


# ---- a raising kernel: the backend of its spec is blamed -------------------------------------


def test_raising_kernel_named_unlike_its_backend_falls_back_without_recursion():
    plugin = _Plugin("raise")
    sel = _selector(plugin)
    sampler = Sampler(seed=0).bind("cpu", V, 8, sel, CTX)
    assert sampler.kernel_name == "custom_sampler"
    logits = _logits(1)
    got = sampler(logits, PARAMS, seeds=SEEDS)
    assert got.tokens == _reference(logits) and not got.failed
    assert plugin.calls == 1
    assert set(sel.unhealthy()) == {"mybackend"}  # the spec's backend, not "custom_sampler"
    assert sampler.kernel_name == "torch.sampler"
    # later steps draw with the torch kernel straight away
    assert sampler(logits, PARAMS, seeds=SEEDS).tokens == _reference(logits)
    assert plugin.calls == 1


def test_fallback_is_bounded_when_no_progress_is_possible():
    """A selector that keeps choosing the failing kernel (marking it unhealthy changes
    nothing) gives the kernel's error after a bounded number of tries, not a RecursionError."""
    plugin = _Plugin("raise")
    sel = _selector(plugin)
    sel.mark_unhealthy = lambda backend, error: None  # a selector that never learns
    sampler = Sampler(seed=0).bind("cpu", V, 8, sel, CTX)
    with pytest.raises(RuntimeError, match="plug-in exploded"):
        sampler(_logits(), PARAMS, seeds=SEEDS)
    assert plugin.calls == kernels_mod.MAX_FALLBACKS + 1


def test_a_backend_already_marked_unhealthy_still_falls_back():
    plugin = _Plugin("raise")
    sel = _selector(plugin)
    sampler = Sampler(seed=0).bind("cpu", V, 8, sel, CTX)
    sel.mark_unhealthy("mybackend", "marked elsewhere")  # the sampler still holds the kernel
    logits = _logits(2)
    assert sampler(logits, PARAMS, seeds=SEEDS).tokens == _reference(logits)
    assert sampler.kernel_name == "torch.sampler"


# ---- junk outputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour", ["shape_2d", "shape_long", "float", "bool", "none", "list", "too_big", "negative"]
)
def test_junk_output_falls_back_and_every_row_gets_the_reference_token(behaviour):
    plugin = _Plugin(behaviour)
    sel = _selector(plugin)
    sampler = Sampler(seed=0).bind("cpu", V, 8, sel, CTX)
    logits = _logits(3)
    got = sampler(logits, PARAMS, seeds=SEEDS)
    assert got.tokens == _reference(logits) and not got.failed
    assert set(sel.unhealthy()) == {"mybackend"}
    assert sampler.kernel_name == "torch.sampler"


def test_engine_style_step_redraws_rows_with_out_of_vocab_ids():
    """prepare / sample / to_host as the runner does it: the out-of-vocabulary row comes back
    flagged (token 0, never an id outside [0, V)), and ``redraw`` fixes the step."""

    class Req:
        def __init__(self, i):
            self.request_id = f"r{i}"
            self.prompt_token_ids = [1, 2]
            self.all_token_ids = [1, 2]
            self.sampling_params = PARAMS[i]
            self.seed = SEEDS[i]

    plugin = _Plugin("too_big")
    sel = _selector(plugin)
    sampler = Sampler(seed=0).bind("cpu", V, 8, sel, CTX)
    reqs = [Req(i) for i in range(len(PARAMS))]
    logits = _logits(4)
    first = sampler.sample(logits, sampler.prepare(reqs)).to_host()
    assert first.failed == {0: kernels_mod.BAD_KERNEL_DETAIL} and first.tokens[0] == 0
    assert all(0 <= t < V for t in first.tokens)
    fixed = sampler.redraw(logits, first, reqs)
    assert not fixed.failed and fixed.tokens == _reference(logits)
    assert set(sel.unhealthy()) == {"mybackend"}


def test_forced_kernel_with_out_of_vocab_ids_fails_only_that_row():
    """A forced (locked) kernel is not replaced: the bad row fails with a clear detail, the
    other rows keep its tokens, logprobs included (no out-of-range gather)."""
    sampler = Sampler(seed=0, kernel=_Plugin("too_big"))
    params = [SamplingParams(temperature=0.8, top_k=5, logprobs=2)] * len(PARAMS)
    logits = _logits(5)
    got = sampler(logits, params, seeds=SEEDS)
    ref = Sampler(seed=0).bind("cpu", V)(logits, params, seeds=SEEDS)
    assert got.failed == {0: kernels_mod.BAD_KERNEL_DETAIL} and got.tokens[0] == 0
    assert got.tokens[1:] == ref.tokens[1:]
    assert [lp.token_id for lp in got.logprobs[1:]] == ref.tokens[1:]


def test_forced_kernel_that_raises_still_raises():
    sampler = Sampler(kernel=_Plugin("raise"))
    with pytest.raises(RuntimeError, match="plug-in exploded"):
        sampler(_logits(), PARAMS, seeds=SEEDS)


# ---- kernels from logits ---------------------------------------------------------------------


class _LogitsPlugin(_Plugin):
    takes_logits = True

    def sample_logits(self, logits, temperature, top_k, top_p, min_p, seed, offset):
        self.calls += 1
        if self.behaviour == "raise":
            raise RuntimeError("plug-in exploded")
        return torch.zeros(3, 3)  # junk shape


@pytest.mark.parametrize("behaviour", ["raise", "junk"])
def test_logits_kernel_failure_falls_back(behaviour):
    plugin = _LogitsPlugin(behaviour)
    sel = _selector(plugin)
    sampler = Sampler(seed=0).bind("cpu", V, 8, sel, CTX)
    logits = _logits(6)
    assert sampler(logits, PARAMS, seeds=SEEDS).tokens == _reference(logits)
    assert plugin.calls == 1 and set(sel.unhealthy()) == {"mybackend"}


# ---- factories -------------------------------------------------------------------------------


def _raising_factory(ctx):
    raise RuntimeError("factory exploded")


@pytest.mark.parametrize("factory", [_raising_factory, lambda ctx: "not a kernel"])
def test_factory_that_raises_or_returns_junk_falls_back_at_bind(factory):
    sel = _selector(None, factory=factory)
    sampler = Sampler(seed=0).bind("cpu", V, 8, sel, CTX)
    assert sampler.kernel_name == "torch.sampler" and set(sel.unhealthy()) == {"mybackend"}
    logits = _logits(7)
    assert sampler(logits, PARAMS, seeds=SEEDS).tokens == _reference(logits)


def test_invariant_partner_factory_that_raises_is_skipped():
    """The chosen kernel is not position-invariant; the best invariant candidate's factory
    raises: bind still succeeds (the torch kernel serves seeded batches)."""
    from layerzero_serve.kernels._torch_backend import SPECS as TORCH_SPECS

    class NotInvariant(_Plugin):
        position_invariant = False

        def sample(self, probs, top_k, top_p, min_p, seed, offset):
            return TorchSamplingKernel().sample(probs, top_k, top_p, min_p, seed, offset)

    torch_sampler = next(s for s in TORCH_SPECS if s.op == Op.SAMPLING)
    common = dict(graph_safe=True, device_types=frozenset({"cpu", "cuda"}))
    specs = [
        torch_sampler,
        KernelSpec("a.main", Op.SAMPLING, "a", 100, factory=lambda ctx: NotInvariant(), **common),
        KernelSpec("b.partner", Op.SAMPLING, "b", 50, factory=_raising_factory, **common),
    ]
    sel = Selector(specs=specs, backends={"torch": OK, "a": OK, "b": OK})
    sampler = Sampler(seed=0).bind("cpu", V, 8, sel, CTX)
    assert sampler.kernel_name == "custom_sampler" and set(sel.unhealthy()) == {"b"}
    logits = _logits(8)
    assert sampler(logits, PARAMS, seeds=SEEDS).tokens == _reference(logits)
