"""``Selector.build`` / ``run_with_fallback`` with factories that raise: the next candidate is
built (the failing backend marked unhealthy), and the fallback is bounded even when marking a
backend unhealthy does not change the selection (it re-raises instead of looping forever)."""

from __future__ import annotations

import pytest

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.selection import BackendState, Selector, configure, reload_policy

OK = BackendState(True, "1", "")
CTX = KernelContext(Op.ATTN_DECODE, device_type="cpu", sm=0, generation="cpu", dtype="float32")
ANY = frozenset({"cpu", "cuda"})


class Runaway(BaseException):
    """Escapes ``except Exception``: stops a fallback loop that would never end."""


@pytest.fixture(autouse=True)
def _clean_policy():
    configure(reset=True)
    reload_policy()
    yield
    configure(reset=True)
    reload_policy()


def _selector(factory) -> Selector:
    specs = [
        KernelSpec("bad.decode", Op.ATTN_DECODE, "bad", 100, device_types=ANY, factory=factory),
        KernelSpec("good.decode", Op.ATTN_DECODE, "good", 10, device_types=ANY, factory=str),
    ]
    return Selector(specs=specs, backends={"bad": OK, "good": OK})


def test_a_raising_factory_falls_back_to_the_next_candidate():
    def factory(ctx):
        raise RuntimeError("factory fault")

    sel = _selector(factory)
    choice, impl = sel.build(Op.ATTN_DECODE, CTX)
    assert choice.name == "good.decode" and impl == str(CTX)
    assert set(sel.unhealthy()) == {"bad"}


def test_fallback_is_bounded_when_marking_changes_nothing():
    calls = []

    def factory(ctx):
        calls.append(1)
        if len(calls) > 20:
            raise Runaway("the fallback loop does not end")
        raise RuntimeError("factory fault")

    sel = _selector(factory)
    sel.mark_unhealthy = lambda backend, error: None  # a selector that never learns
    with pytest.raises(RuntimeError, match="factory fault"):
        sel.build(Op.ATTN_DECODE, CTX)
    assert len(calls) == 2  # the first try, then one retry that lands on the same backend


def test_locked_factory_failure_reraises():
    def factory(ctx):
        raise RuntimeError("factory fault")

    sel = _selector(factory)
    configure(lock={"attention_decode": "bad.decode"})
    with pytest.raises(RuntimeError, match="factory fault"):
        sel.build(Op.ATTN_DECODE, CTX)
    assert sel.unhealthy() == {}
