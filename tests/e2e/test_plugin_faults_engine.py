"""Faulty kernel plug-ins registered through the public API (``register_kernel``) never break the
engine for the requests: an automatic attention / KV-write kernel whose ``plan()`` raises, whose
``run()`` returns the wrong shape, dtype or NaN, or a sampling kernel that raises (named unlike
its backend) or draws ids outside the vocabulary, is replaced by the next candidate (its
backend marked unhealthy) and every request gets the tokens of an engine without the plug-in.
A locked kernel's failure still propagates."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.engine import Engine
from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels._torch_backend import TorchPagedAttention
from layerzero_serve.kernels.sampling_api import TorchSamplingKernel
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

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SAMPLED = [
    SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=8, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=8, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13] * 20]
ANY = frozenset({"cpu", "cuda"})


@pytest.fixture(autouse=True)
def _fresh_selector():
    set_selector(None)
    configure(reset=True)
    reload_policy()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    set_selector(None)
    configure(reset=True)
    torch.set_num_threads(n)


def _generate(params=GREEDY) -> list[list[int]]:
    eng = Engine(model="dummy:tiny", device="cpu")
    plist = params if isinstance(params, list) else [params] * len(PROMPTS)
    ids = [eng.add_request(p, sp) for p, sp in zip(PROMPTS, plist, strict=True)]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            assert o.finish_reason != "error", o
            got[o.request_id].extend(o.new_token_ids)
    _generate.engine = eng
    return [got[i] for i in ids]


def _register(name: str, op: Op, backend: str, factory) -> None:
    register_backend(backend)
    register_kernel(
        KernelSpec(
            name, op, backend, priority=1000, graph_safe=True, device_types=ANY, factory=factory
        )  # fmt: skip
    )


# ---- attention: plan() ----------------------------------------------------------------------


class _PlanFails(TorchPagedAttention):
    """A decode kernel whose host plan raises from the ``fail_from``-th call on."""

    fail_from = 0

    def __init__(self, ctx):
        super().__init__(ctx)
        self.plans = 0

    def plan(self, meta):
        self.plans += 1
        if self.plans > self.fail_from:
            raise RuntimeError("injected plan fault")
        super().plan(meta)


@pytest.mark.parametrize("fail_from", [0, 3])
def test_decode_kernel_whose_plan_raises_falls_back(fail_from):
    expected = _generate()
    cls = type("PlanFails", (_PlanFails,), {"fail_from": fail_from})
    _register("planfail.decode", Op.ATTN_DECODE, "planfail", cls)
    got = _generate()
    assert got == expected
    sel = get_selector()
    assert "planfail" in sel.unhealthy()
    assert _generate.engine.runner.attn.decode.choice.name != "planfail.decode"


def test_locked_kernel_whose_plan_raises_reraises():
    _register("planfail.decode", Op.ATTN_DECODE, "planfail", _PlanFails)
    configure(lock={"attention_decode": "planfail.decode"})
    eng = Engine(model="dummy:tiny", device="cpu")
    eng.add_request([1, 2, 3], GREEDY)
    eng.step()  # prefill: another kernel
    with pytest.raises(RuntimeError, match="injected plan fault"):
        eng.step()


class _WriterPlanFails:
    name = "wplan.kv_write"

    def __init__(self, ctx):
        pass

    def plan(self, meta):
        raise RuntimeError("injected writer plan fault")

    def write(self, k, v, cache, meta):
        torch_ref.write_kv(k, v, cache, meta.slot_mapping)


def test_kv_writer_whose_plan_raises_is_blamed():
    expected = _generate()
    _register("wplan.kv_write", Op.KV_WRITE, "wplan", _WriterPlanFails)
    assert _generate() == expected
    assert set(get_selector().unhealthy()) == {"wplan"}  # the attention kernels are innocent


# ---- attention: junk from run() -------------------------------------------------------------


class _Junk(TorchPagedAttention):
    mode = "transposed"

    def run(self, query, kv_cache, meta):
        out = super().run(query, kv_cache, meta)
        if self.mode == "transposed":  # same number of elements: would reshape silently
            return out.transpose(0, 1).contiguous()
        if self.mode == "float64":
            return out.double()
        if self.mode == "none":
            return None
        if self.mode == "nan":
            return torch.full_like(out, float("nan"))
        if self.mode == "inf_row":  # one sequence's output blows up
            out = out.clone()
            out[-1] = float("inf")
            return out
        raise AssertionError(self.mode)


@pytest.mark.parametrize("mode", ["transposed", "float64", "none", "nan", "inf_row"])
@pytest.mark.parametrize("op", [Op.ATTN_DECODE, Op.ATTN_PREFILL])
def test_attention_kernel_returning_junk_falls_back(mode, op):
    expected = _generate()
    cls = type("Junk", (_Junk,), {"mode": mode})
    _register("junk.attention", op, "junk", cls)
    assert _generate() == expected
    assert set(get_selector().unhealthy()) == {"junk"}


class _NanWriter(_WriterPlanFails):
    name = "nanw.kv_write"

    def plan(self, meta):
        pass

    def write(self, k, v, cache, meta):
        torch_ref.write_kv(torch.full_like(k, float("nan")), v, cache, meta.slot_mapping)


def test_kv_writer_writing_nan_is_blamed_and_the_step_rerun():
    expected = _generate()
    _register("nanw.kv_write", Op.KV_WRITE, "nanw", _NanWriter)
    assert _generate() == expected
    assert set(get_selector().unhealthy()) == {"nanw"}


# ---- sampling -------------------------------------------------------------------------------


class _Sampler:
    """A sampling plug-in whose name does not start with its backend's name."""

    name = "custom_sampler"
    position_invariant = True
    mode = "raise"

    def __init__(self, ctx=None):
        self.calls = 0

    def sample(self, probs, top_k, top_p, min_p, seed, offset):
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("injected sampling fault")
        good = TorchSamplingKernel().sample(probs, top_k, top_p, min_p, seed, offset)
        return torch.where(torch.arange(len(good)) == 0, probs.shape[-1] + 5, good)


@pytest.mark.parametrize("mode", ["raise", "out_of_vocab"])
def test_sampling_plugin_fault_falls_back_with_identical_outputs(mode):
    expected = _generate(SAMPLED)
    cls = type("Sampler", (_Sampler,), {"mode": mode})
    _register("mybackend.sampler", Op.SAMPLING, "mybackend", cls)
    got = _generate(SAMPLED)
    assert got == expected
    assert set(get_selector().unhealthy()) == {"mybackend"}
    assert _generate.engine.runner.sampler.kernel_name == "torch.sampler"


def test_a_model_error_outside_the_kernels_blames_no_backend():
    """An exception that does not come from a kernel of the dispatch (here the model itself)
    propagates at once: no innocent attention backend is marked unhealthy on the way."""
    _register("fine.decode", Op.ATTN_DECODE, "fine", TorchPagedAttention)
    eng = Engine(model="dummy:tiny", device="cpu")
    eng.add_request([1, 2, 3], GREEDY)
    eng.step()

    def broken(*args, **kwargs):
        raise RuntimeError("injected model fault")

    eng.runner.model.forward = broken
    with pytest.raises(RuntimeError, match="injected model fault"):
        eng.step()
    assert get_selector().unhealthy() == {}
    assert eng.runner.attn.decode.choice.name == "fine.decode"


def test_check_sampling_kernel_blames_a_plugin_for_a_step_sampled_elsewhere():
    """The hook for steps whose results arrive without ``execute`` (async scheduling)."""
    from layerzero_serve.sampling._kernels import BAD_KERNEL_DETAIL
    from layerzero_serve.sampling._outputs import HostSample

    cls = type("Sampler", (_Sampler,), {"mode": "out_of_vocab"})
    _register("mybackend.sampler", Op.SAMPLING, "mybackend", cls)
    eng = Engine(model="dummy:tiny", device="cpu")
    runner = eng.runner
    assert runner.sampler.kernel_name == "custom_sampler"
    runner.check_sampling_kernel(HostSample([0, 5], {1: "other failure"}), [])
    assert get_selector().unhealthy() == {}  # nothing to blame
    runner.check_sampling_kernel(HostSample([0, 5], {0: BAD_KERNEL_DETAIL}), [])
    assert set(get_selector().unhealthy()) == {"mybackend"}
    assert runner.sampler.kernel_name == "torch.sampler"
