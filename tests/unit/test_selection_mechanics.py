"""Selection engine mechanics with a synthetic registry: constraints, reasons, determinism,
caching, policy precedence and errors, health fallback, timing tables."""

from __future__ import annotations

import json

import pytest

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op, Reason, Rejection
from layerzero_serve.selection import (
    BackendState,
    PolicyError,
    SelectionError,
    Selector,
    configure,
    context_key,
    explain,
    load_policy_file,
    prefer,
    reload_policy,
)
from layerzero_serve.selection._policy import parse_env_policy

OK = BackendState(True, "1.0", "")
CTX = KernelContext(Op.ATTN_DECODE, sm=90, generation="hopper", dtype="bfloat16", head_dim=128)


def _specs():
    return [
        KernelSpec(
            "fast.decode",
            Op.ATTN_DECODE,
            "fast",
            priority=100,
            graph_safe=True,
            dtypes=frozenset({"bfloat16", "float16"}),
            head_dims=frozenset({128}),
            min_sm=80,
        ),
        KernelSpec("mid.decode", Op.ATTN_DECODE, "mid", priority=50, graph_safe=True, min_sm=80),
        KernelSpec(
            "ref.decode", Op.ATTN_DECODE, "ref", priority=0, device_types=frozenset({"cuda", "cpu"})
        ),
        KernelSpec("ref.prefill", Op.ATTN_PREFILL, "ref", device_types=frozenset({"cuda", "cpu"})),
    ]


@pytest.fixture(autouse=True)
def _clean_policy(monkeypatch):
    monkeypatch.delenv("LZ_KERNEL_POLICY", raising=False)
    monkeypatch.delenv("LZ_KERNEL_POLICY_FILE", raising=False)
    configure(reset=True)
    reload_policy()
    yield
    configure(reset=True)
    reload_policy()


def _sel(**avail):
    backends = {b: OK for b in ("fast", "mid", "ref")}
    backends.update(avail)
    return Selector(specs=_specs(), backends=backends)


def _reasons(choice):
    return {c.name: (c.rejection.code if c.rejection else None) for c in choice.candidates}


def test_highest_priority_supported_kernel_wins_and_losers_say_why():
    sel = _sel()
    ch = sel.select(Op.ATTN_DECODE, CTX)
    assert ch.name == "fast.decode" and not ch.locked
    assert _reasons(ch) == {"fast.decode": None, "mid.decode": None, "ref.decode": None}
    fp32 = KernelContext(Op.ATTN_DECODE, dtype="float32")
    ch = sel.select(Op.ATTN_DECODE, fp32)
    assert ch.name == "mid.decode"
    assert _reasons(ch)["fast.decode"] == Reason.DTYPE
    ampere_d64 = KernelContext(Op.ATTN_DECODE, sm=75, generation="turing", head_dim=64)
    ch = sel.select(Op.ATTN_DECODE, ampere_d64)
    assert ch.name == "ref.decode"
    assert _reasons(ch) == {
        "fast.decode": Reason.SM_TOO_OLD,
        "mid.decode": Reason.SM_TOO_OLD,
        "ref.decode": None,
    }
    graph = KernelContext(Op.ATTN_DECODE, dtype="float32", graph_mode=True, sm=75)
    with pytest.raises(SelectionError) as ei:
        sel.select(Op.ATTN_DECODE, graph)
    assert "not_graph_safe" in str(ei.value) and "sm_too_old" in str(ei.value)


def test_unavailable_backend_gives_its_reason():
    sel = _sel(fast=BackendState(False, None, "import failed: ModuleNotFoundError: fast"))
    ch = sel.select(Op.ATTN_DECODE, CTX)
    assert ch.name == "mid.decode"
    (fast,) = [c for c in ch.candidates if c.name == "fast.decode"]
    assert fast.rejection.code == Reason.BACKEND_UNAVAILABLE
    assert "ModuleNotFoundError" in fast.rejection.message


def test_deterministic_and_cached_and_explained():
    sel = _sel()
    a = sel.select(Op.ATTN_DECODE, CTX)
    b = sel.select(Op.ATTN_DECODE, CTX)
    assert a is b and sel.stats.cold_selections == 1 and sel.stats.select_calls == 2
    assert _sel().select(Op.ATTN_DECODE, CTX) == a  # a fresh selector decides the same
    rep = explain(CTX, sel)
    d = json.loads(rep.to_json())
    assert d["chosen"] == "fast.decode" and len(d["candidates"]) == 3
    assert "* fast.decode" in rep.text()


def test_ties_break_by_name():
    specs = [KernelSpec(n, Op.ATTN_DECODE, "ref", priority=5) for n in ("b.k", "a.k", "c.k")]
    sel = Selector(specs=specs, backends={"ref": OK})
    assert sel.select(Op.ATTN_DECODE, CTX).name == "c.k"


def test_policy_lock_allow_deny_boost_and_cache_invalidation():
    sel = _sel()
    assert sel.select(Op.ATTN_DECODE, CTX).name == "fast.decode"
    with prefer(boost={"mid*": 60}):
        assert sel.select(Op.ATTN_DECODE, CTX).name == "mid.decode"
    assert sel.select(Op.ATTN_DECODE, CTX).name == "fast.decode"
    with prefer(deny=["fast"]):  # a backend pattern
        ch = sel.select(Op.ATTN_DECODE, CTX)
        assert ch.name == "mid.decode" and _reasons(ch)["fast.decode"] == Reason.DENIED_BY_POLICY
    with prefer(allow=["ref*"]):
        ch = sel.select(Op.ATTN_DECODE, CTX)
        assert ch.name == "ref.decode"
        assert _reasons(ch)["fast.decode"] == Reason.NOT_ALLOWED_BY_POLICY
    configure(lock={"attention_decode": "ref.decode"})
    ch = sel.select(Op.ATTN_DECODE, CTX)
    assert ch.name == "ref.decode" and ch.locked
    assert _reasons(ch)["fast.decode"] == Reason.NOT_LOCKED


def test_lock_that_cannot_run_is_an_error_saying_why():
    sel = _sel()
    configure(lock={"attention_decode": "fast.decode"})
    with pytest.raises(SelectionError) as ei:
        sel.select(Op.ATTN_DECODE, KernelContext(Op.ATTN_DECODE, dtype="float32"))
    assert "fast.decode" in str(ei.value) and "dtype" in str(ei.value)
    configure(lock={"attention_decode": "nope.decode"}, reset=True)
    with pytest.raises(SelectionError) as ei:
        sel.select(Op.ATTN_DECODE, CTX)
    assert "nope.decode" in str(ei.value)


def test_precedence_code_over_env_over_file(tmp_path, monkeypatch):
    f = tmp_path / "policy.yaml"
    f.write_text("lock:\n  attention_decode: ref.decode\nboost:\n  'mid*': 7\n")
    monkeypatch.setenv("LZ_KERNEL_POLICY_FILE", str(f))
    reload_policy()
    sel = _sel()
    assert sel.select(Op.ATTN_DECODE, CTX).name == "ref.decode"  # file
    monkeypatch.setenv("LZ_KERNEL_POLICY", "lock.attention_decode=mid.decode")
    reload_policy()
    assert sel.select(Op.ATTN_DECODE, CTX).name == "mid.decode"  # env over file
    configure(lock={"attention_decode": "fast.decode"})
    assert sel.select(Op.ATTN_DECODE, CTX).name == "fast.decode"  # code over env
    with prefer(lock={"attention_decode": "ref.decode"}):
        assert sel.select(Op.ATTN_DECODE, CTX).name == "ref.decode"  # innermost code wins


@pytest.mark.parametrize(
    "text,line",
    [
        ("lock:\n  attention_decode: a\nboost:\n  x: notanint\n", 3),
        ("deny: [a]\nfrobnicate: 1\n", 2),
        ("lock:\n  not_an_op: k\n", 1),
        ("allow: [a, b\ndeny: [c]\n", 2),
    ],
)
def test_invalid_policy_file_names_the_line(tmp_path, text, line):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError) as ei:
        load_policy_file(f)
    assert f"{f}:{line}" in str(ei.value)


def test_env_policy_parsing_and_errors():
    p = parse_env_policy("lock.attention_decode=k1; deny=x*,y* ;boost.t*=10;allow=k*")
    assert p.locks[Op.ATTN_DECODE] == "k1" and p.deny == ("x*", "y*")
    assert p.boosts == {"t*": 10} and p.allow == ("k*",)
    for bad in ("lock.attention_decode", "boost.x=ten", "color=blue", "lock.frob=k"):
        with pytest.raises(PolicyError):
            parse_env_policy(bad)


def test_runtime_failure_falls_back_and_marks_unhealthy():
    sel = _sel()
    calls = []

    def call(choice):
        calls.append(choice.name)
        if choice.spec.backend == "fast":
            raise RuntimeError("illegal memory access")
        return choice.name

    assert sel.run_with_fallback(Op.ATTN_DECODE, CTX, call) == "mid.decode"
    assert calls == ["fast.decode", "mid.decode"]
    assert sel.stats.fallbacks == 1 and "fast" in sel.unhealthy()
    ch = sel.select(Op.ATTN_DECODE, CTX)
    assert _reasons(ch)["fast.decode"] == Reason.BACKEND_UNHEALTHY


def test_locked_runtime_failure_reraises():
    sel = _sel()
    configure(lock={"attention_decode": "fast.decode"})

    def boom(choice):
        raise RuntimeError("kernel crashed")

    with pytest.raises(RuntimeError, match="kernel crashed"):
        sel.run_with_fallback(Op.ATTN_DECODE, CTX, boom)
    assert sel.unhealthy() == {}


def test_import_failure_makes_backend_unavailable(monkeypatch):
    import importlib

    from layerzero_serve.selection._selector import _probe_backends

    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name.split(".")[0] == "flashinfer":
            raise ImportError("libcudart.so.13: cannot open shared object file")
        return real(name, *a, **k)

    kb = pytest.importorskip("layerzero_serve.kernels._backends")
    kb.clear_probe_cache()
    monkeypatch.setattr(importlib, "import_module", fake_import)
    st = _probe_backends("flashinfer")
    kb.clear_probe_cache()
    assert not st.available and "libcudart" in st.reason


def test_timing_table_reorders_measured_candidates():
    key = context_key(CTX)
    sel = Selector(
        specs=_specs(),
        backends={b: OK for b in ("fast", "mid", "ref")},
        timings={"fast.decode": {key: 3e-4}, "mid.decode": {key: 1e-4}},
    )
    ch = sel.select(Op.ATTN_DECODE, CTX)
    # mid: 50 + 100 * 1 = 150; fast: 100 + 100 * 1/3 = 133.3
    assert ch.name == "mid.decode"
    assert {c.name: round(c.score, 1) for c in ch.candidates} == {
        "fast.decode": 133.3,
        "mid.decode": 150.0,
        "ref.decode": 0.0,
    }


def test_register_custom_kernel_and_custom_check():
    sel = _sel()
    only_small = lambda ctx: (
        None
        if ctx.batch_bucket <= 8
        # noqa: E731
        else Rejection(Reason.CUSTOM, "tuned for batch <= 8")
    )
    sel.register(
        KernelSpec(
            "mine.decode",
            Op.ATTN_DECODE,
            "ref",
            priority=500,
            device_types=frozenset({"cuda"}),
            check=only_small,
        )
    )
    assert sel.select(Op.ATTN_DECODE, CTX).name == "mine.decode"
    big = KernelContext(Op.ATTN_DECODE, batch_bucket=64)
    ch = sel.select(Op.ATTN_DECODE, big)
    assert ch.name == "fast.decode" and _reasons(ch)["mine.decode"] == Reason.CUSTOM
    with pytest.raises(ValueError):
        sel.register(KernelSpec("mine.decode", Op.ATTN_DECODE, "ref"))


def test_cached_lookups_make_no_new_decisions():
    sel = _sel()
    first = sel.select(Op.ATTN_DECODE, CTX)
    assert all(sel.select(Op.ATTN_DECODE, CTX) is first for _ in range(100))
    assert sel.stats.cold_selections == 1 and sel.stats.select_calls == 101


def test_register_backend_makes_a_user_kernel_selectable():
    from layerzero_serve.kernels._catalog import all_specs

    sel = Selector(specs=list(all_specs()))
    spec = KernelSpec(
        "user.decode", Op.ATTN_DECODE, "user", priority=500, device_types=frozenset({"cpu"})
    )
    sel.register(spec)
    ctx = KernelContext(Op.ATTN_DECODE, device_type="cpu", sm=0, generation="cpu", dtype="float32")
    choice = sel.select(Op.ATTN_DECODE, ctx)
    lost = {c.name: c.rejection for c in choice.candidates}
    assert choice.spec.name != "user.decode"
    assert lost["user.decode"].code == Reason.BACKEND_UNAVAILABLE
    sel.register_backend("user", version="1.0")
    assert sel.select(Op.ATTN_DECODE, ctx).spec.name == "user.decode"  # cache invalidated
    sel.register_backend("user", available=False, reason="switched off")
    assert sel.select(Op.ATTN_DECODE, ctx).spec.name != "user.decode"
    with pytest.raises(ValueError, match="name"):
        sel.register_backend("")
