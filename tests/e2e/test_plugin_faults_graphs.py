"""Faulty plug-ins with CUDA graphs (GPU only): a decode kernel whose host ``plan()`` raises at
capture or before a replay is replaced by the next candidate (its backend marked unhealthy, the
bucket re-captured), with and without async scheduling, and every request gets the tokens of an
engine without the plug-in; a locked one re-raises. A sampling plug-in that draws ids outside the
vocabulary inside the sampler graphs is blamed too. The plug-in wraps the kernel the engine
would choose anyway (built by a selector without it), so the numerics are the same."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.kernels.sampling_api import TorchSamplingKernel  # noqa: E402
from layerzero_serve.kernels.spec import KernelSpec, Op  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402
from layerzero_serve.selection import (  # noqa: E402
    PolicyState,
    Selector,
    configure,
    get_selector,
    register_backend,
    register_kernel,
    reload_policy,
    set_selector,
)

MODEL = "dummy:small-d128"
PROMPTS = [[5 + i] * (3 + 4 * i) for i in range(6)]
ANY = frozenset({"cpu", "cuda"})


@pytest.fixture(autouse=True)
def _fresh_selector():
    set_selector(None)
    configure(reset=True)
    reload_policy()
    yield
    set_selector(None)
    configure(reset=True)


def _params(i: int, sampled: bool) -> SamplingParams:
    n = 6 + 3 * i  # requests finish at different steps: several buckets get replayed
    if sampled:
        return SamplingParams(temperature=0.9, top_k=30, seed=i, max_tokens=n, ignore_eos=True)
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _generate(async_scheduling: bool = True, sampled: bool = False):
    eng = Engine(
        model=MODEL,
        max_num_seqs=8,
        max_model_len=256,
        num_kv_blocks=256,
        async_scheduling=async_scheduling,
    )
    ids = [eng.add_request(p, _params(i, sampled)) for i, p in enumerate(PROMPTS)]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.finish_reason != "error", o
            got[o.request_id].extend(o.new_token_ids)
    return [got[i] for i in ids], eng


class _PlanFails:
    """Wraps the decode kernel the engine would choose; ``plan`` raises from the
    ``fail_from + 1``-th call of each instance (1 = at the first replay after capture)."""

    host_plan_per_step = True  # plan before every replay, so the fault shows there
    fail_from = 1

    def __init__(self, ctx):
        # a selector without the plug-in, with a policy of its own: the process-wide one may
        # lock the plug-in itself (test_locked_graph_kernel_plan_fault_reraises)
        inner = Selector(policy=PolicyState()).build(ctx.op, ctx)[1]
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "plans", 0)

    def __getattr__(self, name):  # split_rule and other attributes: the inner kernel's
        return getattr(self.__dict__["inner"], name)

    def __setattr__(self, name, value):
        setattr(self.inner, name, value)

    def plan(self, meta):
        object.__setattr__(self, "plans", self.plans + 1)
        if self.plans > self.fail_from:
            raise RuntimeError("injected plan fault")
        self.inner.plan(meta)

    def write_kv(self, k, v, cache, meta):
        self.inner.write_kv(k, v, cache, meta)

    def run(self, q, cache, meta):
        return self.inner.run(q, cache, meta)


def _register(fail_from: int) -> None:
    cls = type("PlanFails", (_PlanFails,), {"fail_from": fail_from})
    register_backend("planfail")
    register_kernel(
        KernelSpec(
            "planfail.decode",
            Op.ATTN_DECODE,
            "planfail",
            priority=1000,
            graph_safe=True,
            device_types=ANY,
            factory=cls,
        )  # fmt: skip
    )


@pytest.mark.parametrize("async_scheduling", [True, False])
@pytest.mark.parametrize("fail_from", [0, 1])
def test_graph_plan_fault_recaptures_with_the_next_kernel(fail_from, async_scheduling):
    expected, _ = _generate(async_scheduling)
    _register(fail_from)
    got, eng = _generate(async_scheduling)
    assert got == expected
    assert "planfail" in get_selector().unhealthy()
    names = [cap.dispatch.decode.choice.name for cap in eng.runner.graphs.graphs.values()]
    if fail_from == 0:  # every bucket fell back while capturing
        assert "planfail.decode" not in names
    else:  # the buckets that were replayed were re-captured with another kernel
        assert any(n != "planfail.decode" for n in names)


def test_locked_graph_kernel_plan_fault_reraises():
    _register(1)
    configure(lock={"attention_decode": "planfail.decode"})
    with pytest.raises(RuntimeError, match="injected plan fault"):
        _generate(async_scheduling=False)


class _OutOfVocab:
    name = "custom_sampler"
    position_invariant = True

    def __init__(self, ctx=None):
        pass

    def sample(self, probs, top_k, top_p, min_p, seed, offset):
        good = TorchSamplingKernel().sample(probs, top_k, top_p, min_p, seed, offset)
        rows = torch.arange(good.shape[0], device=good.device)
        return torch.where(rows == 0, probs.shape[-1] + 5, good)


def test_sampling_plugin_out_of_vocab_in_sampler_graphs_is_blamed():
    expected, _ = _generate(async_scheduling=False, sampled=True)
    register_backend("mybackend")
    register_kernel(
        KernelSpec(
            "mybackend.sampler",
            Op.SAMPLING,
            "mybackend",
            priority=1000,
            graph_safe=True,
            device_types=ANY,
            factory=_OutOfVocab,
        )  # fmt: skip
    )
    got, eng = _generate(async_scheduling=False, sampled=True)
    assert got == expected
    assert "mybackend" in get_selector().unhealthy()
    assert eng.runner.sampler.kernel_name != "custom_sampler"
