"""The engine asks the selection engine once per plan, never per step; an automatic kernel
that fails at run time falls back (same outputs) and its backend is marked unhealthy; a locked
kernel's failure re-raises."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve.engine import Engine
from layerzero_serve.kernels.spec import KernelSpec, Op
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.selection import (
    BackendState,
    Selector,
    configure,
    get_selector,
    reload_policy,
    set_selector,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [13] * 20]


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


def _generate(eng: Engine) -> list[list[int]]:
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    return [got[i] for i in ids]


def test_select_is_called_once_per_plan_not_per_step():
    eng = Engine(model="dummy:tiny", device="cpu")
    sel = get_selector()
    calls = sel.stats.select_calls
    assert calls == len(eng.runner.plans)  # one per plan at start-up
    _generate(eng)
    assert eng.runner.timings.steps >= 10
    assert sel.stats.select_calls == calls


class _Flaky:
    """A decode kernel that fails at run time (an injected fault)."""

    def __init__(self, ctx):
        from layerzero_serve.kernels._torch_backend import TorchPagedAttention

        self.inner = TorchPagedAttention(ctx)
        self.name = "flaky.decode"

    def plan(self, meta):
        self.inner.plan(meta)

    def write_kv(self, k, v, cache, meta):
        self.inner.write_kv(k, v, cache, meta)

    def run(self, q, cache, meta):
        raise RuntimeError("injected kernel fault")


def _selector_with_flaky() -> Selector:
    from layerzero_serve.kernels._catalog import all_specs

    sel = Selector(specs=list(all_specs()))
    sel.register(
        KernelSpec(
            "flaky.decode",
            Op.ATTN_DECODE,
            "flaky",
            priority=1000,
            graph_safe=True,
            device_types=frozenset({"cpu", "cuda"}),
            factory=_Flaky,
        )
    )
    sel.backends = {
        **{
            b: sel.backend_state(b)
            for b in ("torch", "triton", "flashinfer", "flash_attn", "xformers", "liger_kernel")
        },
        "flaky": BackendState(True, "0", ""),
    }
    return sel


def test_runtime_failure_falls_back_with_identical_outputs():
    expected = _generate(Engine(model="dummy:tiny", device="cpu"))
    sel = _selector_with_flaky()
    set_selector(sel)
    eng = Engine(model="dummy:tiny", device="cpu")
    assert eng.runner.attn.decode.choice.name == "flaky.decode"
    assert _generate(eng) == expected
    assert "flaky" in sel.unhealthy() and sel.stats.fallbacks == 1
    assert eng.runner.attn.decode.choice.name != "flaky.decode"


def test_locked_kernel_failure_reraises():
    set_selector(_selector_with_flaky())
    configure(lock={"attention_decode": "flaky.decode"})
    eng = Engine(model="dummy:tiny", device="cpu")
    eng.add_request([1, 2, 3], GREEDY)
    eng.step()  # prefill: another kernel
    with pytest.raises(RuntimeError, match="injected kernel fault"):
        eng.step()


class _FlakyWriter:
    """A KV writer that fails at run time (an injected fault)."""

    name = "flaky.kv_write"

    def __init__(self, ctx):
        pass

    def plan(self, meta):
        pass

    def write(self, k, v, cache, meta):
        raise RuntimeError("injected kv-write fault")


def test_kv_writer_failure_falls_back_and_blames_the_writer():
    expected = _generate(Engine(model="dummy:tiny", device="cpu"))
    sel = _selector_with_flaky()
    sel.register(
        KernelSpec(
            "flaky.kv_write",
            Op.KV_WRITE,
            "flakyw",
            priority=1000,
            graph_safe=True,
            device_types=frozenset({"cpu", "cuda"}),
            factory=_FlakyWriter,
        )
    )
    sel.backends["flakyw"] = BackendState(True, "0", "")
    configure(deny=["flaky.decode"])
    set_selector(sel)
    eng = Engine(model="dummy:tiny", device="cpu")
    assert eng.runner.attn.writer.choice.name == "flaky.kv_write"
    assert _generate(eng) == expected
    assert set(sel.unhealthy()) == {"flakyw"}
    assert eng.runner.attn.writer.choice.name == "torch.kv_write"


def _broken_factory(ctx):
    raise RuntimeError("injected factory fault")


def test_a_factory_that_raises_at_start_up_falls_back():
    """An automatic kernel whose factory raises is passed over when the engine builds its
    kernels (its backend marked unhealthy); the outputs are the default engine's."""
    expected = _generate(Engine(model="dummy:tiny", device="cpu"))
    sel = _selector_with_flaky()
    sel.register(
        KernelSpec(
            "broken.decode",
            Op.ATTN_DECODE,
            "flaky",
            priority=2000,
            graph_safe=True,
            device_types=frozenset({"cpu", "cuda"}),
            factory=_broken_factory,
        )
    )
    set_selector(sel)
    eng = Engine(model="dummy:tiny", device="cpu")
    assert "flaky" in sel.unhealthy()
    assert eng.runner.attn.decode.choice.name not in ("broken.decode", "flaky.decode")
    assert _generate(eng) == expected
