"""Input validation of the selection engine (fuzzing review S1-S4): KernelSpec/KernelContext
fields, the registry, select/explain arguments, configure/prefer, LZ_KERNEL_POLICY and the YAML
policy file. Every bad input is a ValidationError (or PolicyError) naming the parameter, and one
broken user kernel never breaks selection for everyone."""

from __future__ import annotations

import math

import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op, Reason, Rejection
from layerzero_serve.selection import (
    BackendState,
    Policy,
    PolicyError,
    Selector,
    configure,
    effective_policy,
    explain,
    get_selector,
    load_policy_file,
    prefer,
    register_backend,
    register_kernel,
    reload_policy,
    select,
    set_selector,
)
from layerzero_serve.selection._policy import parse_env_policy

OK = BackendState(True, "1.0", "")
CPU = dict(device_type="cpu", sm=0, generation="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("LZ_KERNEL_POLICY", raising=False)
    monkeypatch.delenv("LZ_KERNEL_POLICY_FILE", raising=False)
    configure(reset=True)
    reload_policy()
    yield
    configure(reset=True)
    reload_policy()
    set_selector(None)


def _spec(**kw):
    base = dict(name="user.decode", op=Op.ATTN_DECODE, backend="user")
    base.update(kw)
    return KernelSpec(**base)


def _catalog_selector(**extra) -> Selector:
    from layerzero_serve.kernels._catalog import all_specs

    return Selector(specs=list(all_specs()), backends={"torch": OK, "user": OK, **extra})


# ---- S1: KernelSpec --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("name", ""),
        ("name", None),
        ("op", "not_an_op"),
        ("op", 3),
        ("backend", ""),
        ("backend", 5),
        ("priority", True),
        ("priority", math.nan),
        ("priority", math.inf),
        ("priority", "10"),
        ("graph_safe", "yes"),
        ("graph_safe", 1),
        ("device_types", "cuda"),
        ("device_types", {"gpu"}),
        ("device_types", frozenset()),
        ("dtypes", "bfloat16"),  # a bare str used to substring-match float16
        ("dtypes", {"bf16"}),
        ("dtypes", [None]),
        ("head_dims", 128),
        ("head_dims", [64.0]),
        ("head_dims", [-8]),
        ("head_dims", [True]),
        ("block_sizes", "16"),
        ("gqa_ratios", {1: 2}),
        ("generations", "hopper"),
        ("generations", ["volta"]),
        ("q_lens", [1, "2"]),
        ("min_sm", -1),
        ("min_sm", 8.0),
        ("min_sm", None),
        ("max_batch", 0),
        ("max_batch", True),
        ("check", 5),
        ("factory", "mymod.make"),
        ("doc", None),
    ],
)
def test_kernel_spec_rejects_bad_fields(field, value):
    with pytest.raises(ValidationError, match=f"KernelSpec.{field}") as ei:
        _spec(**{field: value})
    assert ei.value.param == f"KernelSpec.{field}"


def test_kernel_spec_normalises_collections_and_op_string():
    s = _spec(
        op="attention_decode",
        dtypes=["bfloat16", "float16"],
        head_dims=(64, 128),
        block_sizes={16},
        gqa_ratios=range(1, 9),
        generations=["hopper"],
        q_lens=[1],
        device_types=None,  # any
    )
    assert s.op is Op.ATTN_DECODE
    for f in ("dtypes", "head_dims", "block_sizes", "gqa_ratios", "generations", "q_lens"):
        assert isinstance(getattr(s, f), frozenset), f
    assert s.dtypes == {"bfloat16", "float16"}
    hash(s)  # a spec given sets is still hashable
    # the str-substring bug: float16 is not accepted by a bfloat16-only kernel
    ctx = KernelContext(Op.ATTN_DECODE, dtype="float16")
    assert _spec(dtypes=["bfloat16"]).supports(ctx).code is Reason.DTYPE
    # device_types=None: any device; the first constraint that fails is the generation
    assert s.supports(KernelContext(Op.ATTN_DECODE, **CPU)).code is Reason.GENERATION


# ---- S1: KernelContext -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("op", "nope"),
        ("op", None),
        ("device_type", "gpu"),
        ("device_type", None),
        ("sm", -1),
        ("sm", 9.0),
        ("sm", True),
        ("generation", "volta"),
        ("dtype", "bf16"),
        ("dtype", "float64"),
        ("head_dim", -1),
        ("head_dim", 128.0),
        ("num_q_heads", "32"),
        ("num_kv_heads", -8),
        ("block_size", None),
        ("batch_bucket", True),
        ("q_len", -1),
        ("vocab_size", 1.5),
        ("graph_mode", 1),
        ("graph_mode", "false"),
    ],
)
def test_kernel_context_rejects_bad_fields(field, value):
    kw = {"op": Op.ATTN_DECODE, field: value}
    with pytest.raises(ValidationError, match=f"KernelContext.{field}") as ei:
        KernelContext(**kw)
    assert ei.value.param == f"KernelContext.{field}"


def test_kernel_context_accepts_op_string_and_every_known_device():
    assert KernelContext("sampling", vocab_size=10).op is Op.SAMPLING
    assert KernelContext("sampling") == KernelContext(Op.SAMPLING)
    from layerzero_serve.selection import FAKE_DEVICES
    from layerzero_serve.selection.plans import ModelShape, model_plans

    for dev in FAKE_DEVICES.values():
        for dtype in ("float32", "bfloat16", "float16"):
            plans = model_plans(dev, ModelShape(dtype, 128, 32, 8, 32000), 16, 8, [1, 2, 8])
            assert plans


def test_rejection_validates_code():
    assert Rejection("custom", "x").code is Reason.CUSTOM
    with pytest.raises(ValidationError, match="Rejection.code"):
        Rejection("nope", "x")


# ---- S1: a broken user check never breaks selection ------------------------------------------
def _raise(ctx):
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    "check, needle",
    [(_raise, "RuntimeError: boom"), (lambda ctx: "nope", "str"), (lambda ctx: 1 / 0, "Zero")],
)
def test_broken_check_is_a_custom_rejection_and_builtins_still_win(check, needle):
    sel = _catalog_selector()
    sel.register(_spec(priority=10_000, device_types={"cpu", "cuda"}, check=check))
    ctx = KernelContext(Op.ATTN_DECODE, **CPU)
    choice = sel.select(Op.ATTN_DECODE, ctx)
    assert choice.name == "torch.paged_decode"
    lost = {c.name: c.rejection for c in choice.candidates}
    assert lost["user.decode"].code is Reason.CUSTOM and needle in lost["user.decode"].message
    report = explain(ctx, sel)
    assert report.error is None and report.choice.name == "torch.paged_decode"
    assert "user.decode" in report.text() and report.to_json()


def test_broken_check_through_the_process_wide_registry():
    set_selector(_catalog_selector())
    register_backend("user")
    register_kernel(_spec(priority=10_000, device_types=["cpu"], check=_raise))
    ctx = KernelContext(Op.ATTN_DECODE, **CPU)
    assert select(Op.ATTN_DECODE, ctx).name == "torch.paged_decode"
    assert explain(ctx).choice.name == "torch.paged_decode"


def test_raising_backend_probe_makes_backend_unavailable_not_fatal():
    def probe(name):
        if name == "user":
            raise OSError("probe exploded")
        return OK

    from layerzero_serve.kernels._catalog import all_specs

    sel = Selector(specs=list(all_specs()), backends=probe)
    sel.register(_spec(priority=10_000, device_types=["cpu"]))
    choice = sel.select(Op.ATTN_DECODE, KernelContext(Op.ATTN_DECODE, **CPU))
    assert choice.name == "torch.paged_decode"
    lost = {c.name: c.rejection for c in choice.candidates}
    assert lost["user.decode"].code is Reason.BACKEND_UNAVAILABLE


def test_bad_timing_entries_are_ignored():
    from layerzero_serve.selection import context_key

    ctx = KernelContext(Op.ATTN_DECODE, **CPU)
    specs = [_spec(name="a.k", device_types=["cpu"]), _spec(name="b.k", device_types=["cpu"])]
    sel = Selector(
        specs=specs,
        backends={"user": OK},
        timings={"a.k": {context_key(ctx): 0.0}, "b.k": {context_key(ctx): "fast"}},
    )
    assert sel.select(Op.ATTN_DECODE, ctx).name == "b.k"  # tie broken by name


def test_failing_factory_falls_back_to_the_next_candidate():
    def bad_factory(ctx):
        raise RuntimeError("cannot build")

    sel = _catalog_selector()
    sel.register(_spec(priority=10_000, device_types=["cpu"], factory=bad_factory))
    ctx = KernelContext(Op.ATTN_DECODE, **CPU)
    choice, impl = sel.build(Op.ATTN_DECODE, ctx)
    assert choice.name == "torch.paged_decode" and impl is not None
    assert "user" in sel.unhealthy()


# ---- S1: registry arguments ------------------------------------------------------------------
@pytest.mark.parametrize("spec", [None, {"name": "x"}, "user.decode"])
def test_register_kernel_requires_a_spec(spec):
    set_selector(_catalog_selector())
    with pytest.raises(ValidationError, match="spec"):
        register_kernel(spec)


def test_register_kernel_replace_must_be_bool():
    set_selector(_catalog_selector())
    with pytest.raises(ValidationError, match="replace"):
        register_kernel(_spec(), replace="no")


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"name": ""}, "name"),
        ({"name": None}, "name"),
        ({"available": "no"}, "available"),
        ({"available": 0}, "available"),
        ({"version": 5}, "version"),
    ],
)
def test_register_backend_arguments(kw, param):
    set_selector(_catalog_selector())
    args = {"name": "user", **kw}
    with pytest.raises(ValidationError, match=param):
        register_backend(**args)


def test_selector_constructor_arguments():
    with pytest.raises(ValidationError, match="specs"):
        Selector(specs=5, backends={})
    with pytest.raises(ValidationError, match="spec"):
        Selector(specs=[None], backends={})
    with pytest.raises(ValidationError, match="backends"):
        Selector(specs=[], backends=5)
    with pytest.raises(ValidationError, match="timings"):
        Selector(specs=[], backends={}, timings=[1])
    with pytest.raises(ValidationError, match="selector"):
        set_selector("default")


# ---- S2: select / explain arguments ----------------------------------------------------------
def test_select_checks_op_even_on_a_cache_hit():
    sel = _catalog_selector()
    ctx = KernelContext(Op.ATTN_DECODE, **CPU)
    assert sel.select(Op.ATTN_DECODE, ctx).name == "torch.paged_decode"
    with pytest.raises(ValidationError, match="ctx.op"):
        sel.select(Op.ATTN_PREFILL, ctx)  # cached context, different op
    with pytest.raises(ValidationError, match="op"):
        sel.select(5, ctx)
    with pytest.raises(ValidationError, match="op"):
        sel.select("not_an_op", ctx)
    assert sel.select("attention_decode", ctx).name == "torch.paged_decode"


def test_select_and_explain_require_a_context():
    sel = _catalog_selector()
    with pytest.raises(ValidationError, match="ctx"):
        sel.select(Op.ATTN_DECODE, None)
    set_selector(sel)
    with pytest.raises(ValidationError, match="ctx"):
        select(Op.ATTN_DECODE, None)
    with pytest.raises(ValidationError, match="ctx"):
        explain(None)
    with pytest.raises(ValidationError, match="ctx"):
        explain({"op": "attention_decode"})
    with pytest.raises(ValidationError, match="selector"):
        explain(KernelContext(Op.ATTN_DECODE, **CPU), selector="mine")


# ---- S3: configure / prefer ------------------------------------------------------------------
def test_generators_are_materialised_not_consumed():
    p = configure(deny=(x for x in ["xformers*"]), allow=iter(["torch*"]), reset=True)
    assert p.deny == ("xformers*",) and p.allow == ("torch*",)
    assert effective_policy().deny == ("xformers*",)
    with prefer(deny=(x for x in ["flash_attn*"])) as q:
        assert q.deny == ("flash_attn*",)


def test_none_allow_deny_mean_empty():
    p = configure(allow=None, deny=None, reset=True)
    assert p.allow == () and p.deny == ()
    with prefer(allow=None, deny=None) as q:
        assert q.allow == () and q.deny == ()


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"allow": 5}, "allow"),
        ({"allow": "torch*"}, "allow"),
        ({"deny": [""]}, "deny"),
        ({"deny": [None]}, "deny"),
        ({"deny": {"a": 1}}, "deny"),
        ({"lock": [("attention_decode", "torch.paged_decode")]}, "lock"),
        ({"lock": "attention_decode=torch.paged_decode"}, "lock"),
        ({"lock": {"nope": "x"}}, "lock"),
        ({"lock": {"attention_decode": ""}}, "lock.attention_decode"),
        ({"boost": [("torch*", 1)]}, "boost"),
        ({"boost": {"torch*": 10**400}}, r"boost\.torch\*"),
        ({"boost": {"torch*": math.inf}}, r"boost\.torch\*"),
        ({"boost": {"torch*": math.nan}}, r"boost\.torch\*"),
        ({"boost": {"torch*": 2e6}}, r"boost\.torch\*"),
        ({"boost": {"torch*": True}}, r"boost\.torch\*"),
        ({"boost": {"torch*": "10"}}, r"boost\.torch\*"),
        ({"boost": {"": 1}}, "boost"),
        ({"boost": {5: 1}}, "boost"),
    ],
)
def test_configure_and_prefer_reject_bad_arguments(kw, param):
    with pytest.raises(PolicyError, match=param):
        configure(**kw)
    with pytest.raises(PolicyError, match=param), prefer(**kw):
        pass
    assert effective_policy().fingerprint() == Policy().fingerprint()  # nothing half-applied


def test_configure_reset_must_be_bool():
    with pytest.raises(ValidationError, match="reset"):
        configure(reset="yes")


def test_finite_float_boost_is_accepted_and_scored():
    sel = _catalog_selector()
    sel.register(_spec(priority=0, device_types=["cpu"]))
    ctx = KernelContext(Op.ATTN_DECODE, **CPU)
    configure(boost={"user*": 1e5}, reset=True)
    assert sel.select(Op.ATTN_DECODE, ctx).name == "user.decode"


# ---- S3: LZ_KERNEL_POLICY --------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "boost.=3",
        "boost.torch*=1e400",
        "boost.torch*=" + "9" * 400,
        "boost.torch*=inf",
        "boost.torch*=fast",
        "lock.=torch.paged_decode",
        "lock.nope=torch.paged_decode",
        "allow=torch*,,flashinfer*",
    ],
)
def test_env_policy_errors_name_the_entry(text, monkeypatch):
    with pytest.raises(PolicyError, match="LZ_KERNEL_POLICY entry 1"):
        parse_env_policy(text)
    monkeypatch.setenv("LZ_KERNEL_POLICY", "deny=xformers*;" + text)
    reload_policy()
    with pytest.raises(PolicyError, match="LZ_KERNEL_POLICY entry 2"):
        effective_policy()


def test_env_policy_float_boost():
    assert parse_env_policy("boost.torch*=2.5").boosts == {"torch*": 2.5}


# ---- S4: the YAML policy file ----------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "lock: !!python/object:os.system {}\n",
        "lock: {attention_decode: !!python/object/apply:os.system [echo hi]}\n",
        "boost: {[a]: 1}\n",
        "lock: {? [a, b] : x}\n",
        "boost: {torch*: 1e400}\n",
        "boost: {torch*: 10000000}\n",
        "boost: [torch*]\n",
        "lock: [attention_decode]\n",
        "allow: torch*\n",
        "deny: {a: 1}\n",
        "? [lock]\n: x\n",
    ],
)
def test_bad_policy_file_is_a_policy_error_naming_the_file(tmp_path, text, monkeypatch):
    f = tmp_path / "policy.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError, match="policy.yaml"):
        load_policy_file(f)
    monkeypatch.setenv("LZ_KERNEL_POLICY_FILE", str(f))
    reload_policy()
    with pytest.raises(PolicyError, match="policy.yaml"):
        effective_policy()


def test_policy_file_error_names_the_line(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("deny: [xformers*]\nlock: !!python/object:os.system {}\n")
    with pytest.raises(PolicyError, match=r"policy\.yaml:2"):
        load_policy_file(f)


def test_non_utf8_policy_file(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_bytes(b"deny: [\xff\xfe]\n")
    with pytest.raises(PolicyError, match="policy.yaml") as ei:
        load_policy_file(f)
    assert isinstance(ei.value, ValueError) and "UTF-8" in str(ei.value)


def test_unreadable_policy_path(tmp_path):
    with pytest.raises(PolicyError, match=str(tmp_path)):
        load_policy_file(tmp_path)  # a directory
    with pytest.raises(PolicyError, match="path"):
        load_policy_file(None)


def test_good_policy_file_still_loads(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text(
        "lock: {attention_decode: torch.paged_decode}\nallow: [torch*]\n"
        "deny: [xformers*]\nboost: {triton*: 10, torch*: 2.5}\n"
    )
    p = load_policy_file(f)
    assert p.locks == {Op.ATTN_DECODE: "torch.paged_decode"}
    assert p.allow == ("torch*",) and p.deny == ("xformers*",)
    assert p.boosts == {"triton*": 10, "torch*": 2.5}


def test_policy_error_is_a_value_error():
    assert issubclass(PolicyError, ValidationError) and issubclass(PolicyError, ValueError)
    assert get_selector() is not None
