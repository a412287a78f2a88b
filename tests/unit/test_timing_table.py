"""Measured timings drive the kernel choice: the persistent per-device table (round trip,
fingerprint invalidation, corrupt files), selection by measurement (over priority and boosts,
never over a lock or a deny), explain's times, the tuning routine on fake kernels that sleep,
input validation, and the engine reading the table at start-up."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.selection import (
    BackendState,
    DeviceInfo,
    Measurement,
    PolicyState,
    Selector,
    TimingTable,
    TuneSettings,
    apply_device_timings,
    check_table_path,
    context_key,
    device_fingerprint,
    explain,
    read_table,
    set_selector,
    tune_device,
    tune_plans,
)

OK = BackendState(True, "1.0", "")
BACKENDS = {"hi": OK, "lo": OK, "new": OK, "bad": OK, "triton": BackendState(False, "3.1", "")}
DEV = DeviceInfo(type="cpu", name="Test CPU", torch="2.5.0")
CTX = KernelContext(Op.SAMPLING, device_type="cpu", sm=0, generation="cpu", dtype="float32",
                    batch_bucket=4, vocab_size=64)  # fmt: skip
KEY = context_key(CTX)


class Sleeper:
    """A sampling kernel that takes ``seconds`` per call."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def sample(self, probs, top_k, top_p, min_p, seed, offset):
        time.sleep(self.seconds)
        return probs.argmax(-1)


def _broken(ctx):
    raise RuntimeError("cannot build here")


def _spec(name: str, priority: int, factory=None) -> KernelSpec:
    return KernelSpec(name, Op.SAMPLING, name.split(".")[0], priority=priority,
                      device_types=["cpu"], factory=factory)  # fmt: skip


def _specs() -> list[KernelSpec]:
    return [
        _spec("hi.sample", 100, lambda ctx: Sleeper(0.006)),  # high priority, slow
        _spec("lo.sample", 0, lambda ctx: Sleeper(0.001)),  # low priority, fast
        _spec("bad.sample", 50, _broken),
    ]


def _sel(timings=None, specs=None) -> Selector:
    return Selector(specs=specs or _specs(), backends=BACKENDS, timings=timings,
                    policy=PolicyState())  # fmt: skip


def _table(**medians: float) -> TimingTable:
    t = TimingTable(device_fingerprint(DEV, _sel()))
    for name, med in medians.items():
        t.put(f"{name}.sample", KEY, Measurement(med, med * 1.5, 10))
    return t


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in ("LZ_TIMING_TABLE", "LZ_TUNE_AT_STARTUP", "LZ_KERNEL_POLICY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LZ_TIMING_DIR", str(tmp_path / "timings"))
    set_selector(None)
    yield
    set_selector(None)


# ---- the table file ---------------------------------------------------------------------------
def test_round_trip_keeps_medians_p95_failures_and_fingerprint(tmp_path):
    t = _table(hi=2e-3, lo=1e-3)
    t.put("bad.sample", KEY, Measurement(None, None, 0, "RuntimeError: boom"))
    path = t.save(tmp_path / "sub" / "t.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.json"]  # no temp file left
    doc = json.loads(path.read_text())
    assert doc["format"] == "layerzero_serve.timings/1"
    assert doc["fingerprint"]["backends"]["hi"] == "1.0"
    back = read_table(path)
    assert back.fingerprint == t.fingerprint and back.entries == t.entries
    assert back.get("lo.sample", KEY) == Measurement(1e-3, 1.5e-3, 10)
    assert not back.get("bad.sample", KEY).ok and back.get("bad.sample", KEY).error


def test_legacy_flat_table_still_reads():
    legacy = {"hi.sample": {KEY: 3e-4}, "lo.sample": {KEY: 1e-4, "bad key": "fast"}}
    t = TimingTable.from_json(legacy)
    assert t.fingerprint is None and len(t) == 2
    assert _sel(t).select(Op.SAMPLING, CTX).name == "lo.sample"


@pytest.mark.parametrize(
    "change, phrase",
    [
        ({"name": "Other CPU"}, "device Test CPU -> Other CPU"),
        ({"driver": "555.42"}, "driver - -> 555.42"),
        ({"cuda": "12.8"}, "cuda - -> 12.8"),
        ({"torch": "2.6.0"}, "torch 2.5.0 -> 2.6.0"),
        ({"hi": "2.0"}, "hi 1.0 -> 2.0"),
        ({"triton": "3.2"}, "triton 3.1 -> 3.2"),
    ],
)
def test_any_version_change_invalidates_the_table(tmp_path, caplog, change, phrase):
    path = _table(hi=2e-3, lo=1e-3).save(tmp_path / "t.json")
    sel = _sel()
    dev_changes = {k: v for k, v in change.items() if k in ("name", "driver", "cuda", "torch")}
    for backend, version in change.items():
        if backend not in dev_changes:
            sel.register_backend(backend, BACKENDS[backend].available, version)
    with caplog.at_level(logging.WARNING, logger="layerzero_serve"):
        note = apply_device_timings(sel, replace(DEV, **dev_changes), path)
    assert phrase in note and "ignored" in note and phrase in caplog.text
    assert sel.timings is None
    rep = explain(CTX, sel)
    assert rep.choice.name == "hi.sample" and not rep.choice.by_measurement  # by priority
    assert phrase in rep.text() and phrase in rep.to_dict()["timings"]


def test_matching_table_applies(tmp_path):
    path = _table(hi=2e-3, lo=1e-3).save(tmp_path / "t.json")
    sel = _sel()
    assert "fingerprint matches" in apply_device_timings(sel, DEV, path)
    assert sel.select(Op.SAMPLING, CTX).name == "lo.sample"


@pytest.mark.parametrize("text", ["{not json", '{"format": "other/9"}', "[1, 2]", "\udcff"])
def test_corrupt_file_is_a_warning_and_no_table(tmp_path, caplog, monkeypatch, text):
    path = tmp_path / "t.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="layerzero_serve"):
        assert read_table(path) is None
        monkeypatch.setenv("LZ_TIMING_TABLE", str(path))
        sel = _sel()  # reads LZ_TIMING_TABLE: no crash
    assert "unreadable" in caplog.text and sel.timings is None
    assert sel.select(Op.SAMPLING, CTX).name == "hi.sample"


def test_env_table_off_and_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LZ_TIMING_TABLE", "off")
    _table(lo=1e-3, hi=2e-3).save(tmp_path / "timings" / "cpu-test-cpu.json")
    sel = _sel()
    assert "disabled" in apply_device_timings(sel, DEV) and sel.timings is None
    monkeypatch.setenv("LZ_TIMING_TABLE", str(tmp_path / "absent.json"))
    assert _sel().timings is None  # no crash either


# ---- selection by measurement -----------------------------------------------------------------
def test_measured_faster_kernel_wins_over_priority_and_boosts():
    sel = _sel(_table(hi=2e-3, lo=1e-3), specs=[*_specs(), _spec("new.sample", 1000)])
    sel.policy.configure(boost={"hi*": 1e6})
    ch = sel.select(Op.SAMPLING, CTX)
    assert ch.name == "lo.sample" and ch.by_measurement
    cands = {c.name: c for c in ch.candidates}
    assert cands["lo.sample"].median_s == 1e-3 and cands["lo.sample"].p95_s == 1.5e-3
    assert cands["new.sample"].median_s is None  # unmeasured: ranks after the measured ones
    assert cands["hi.sample"].score > cands["new.sample"].score > cands["lo.sample"].score


def test_one_measurement_leaves_the_choice_to_the_score():
    ch = _sel(_table(lo=1e-3)).select(Op.SAMPLING, CTX)
    assert ch.name == "hi.sample" and not ch.by_measurement


def test_lock_and_deny_still_win_over_measurement():
    sel = _sel(_table(hi=2e-3, lo=1e-3))
    sel.policy.configure(lock={"sampling": "hi.sample"})
    ch = sel.select(Op.SAMPLING, CTX)
    assert ch.name == "hi.sample" and ch.locked and not ch.by_measurement
    assert "policy lock" in explain(CTX, sel).text()
    sel.policy.configure(reset=True, deny=["lo*"])
    assert sel.select(Op.SAMPLING, CTX).name == "hi.sample"


def test_explain_shows_times_and_says_the_choice_was_by_measurement():
    t = _table(hi=2e-3, lo=1e-3)
    t.put("bad.sample", KEY, Measurement(None, None, 0, "RuntimeError: boom"))
    rep = explain(CTX, _sel(t))
    text = rep.text()
    assert "chosen by measurement: lo.sample" in text
    assert "median 1000.0 us, p95 1500.0 us" in text and "median 2000.0 us" in text
    assert "tuning failed: RuntimeError: boom" in text
    lines = [ln for ln in text.splitlines() if ".sample  " in ln]
    assert lines[0].lstrip().startswith("* lo.sample") and "hi.sample" in lines[1]
    d = rep.to_dict()
    assert d["by_measurement"] and d["chosen"] == "lo.sample"
    by_name = {c["kernel"]: c for c in d["candidates"]}
    assert by_name["hi.sample"]["median_s"] == 2e-3 and by_name["hi.sample"]["p95_s"] == 3e-3


# ---- the tuning routine -----------------------------------------------------------------------
def test_tune_measures_sleeping_kernels_and_the_faster_wins():
    sel = _sel()
    table = TimingTable(device_fingerprint(DEV, sel))
    seen = []
    settings = TuneSettings(reps=3, warmup=1)
    res = tune_plans([CTX], table, sel, settings, "cpu", lambda *a: seen.append(a))
    (r,) = res
    hi, lo = r.measured["hi.sample"], r.measured["lo.sample"]
    assert lo.ok and hi.ok and lo.reps == 3 and lo.median_s <= lo.p95_s
    assert 0.001 <= lo.median_s < hi.median_s and hi.median_s >= 0.006
    assert not r.measured["bad.sample"].ok and "cannot build here" in r.measured["bad.sample"].error
    assert r.fastest == "lo.sample" and [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    fresh = _sel(table)
    assert fresh.select(Op.SAMPLING, CTX).name == "lo.sample"
    # measured entries are kept unless forced
    again = tune_plans([CTX], table, sel, settings, "cpu")[0]
    assert set(again.kept) == {"hi.sample", "lo.sample"} and set(again.measured) == {"bad.sample"}


def test_tune_skips_triton_kernels_on_the_cpu():
    spec = KernelSpec("triton.sample", Op.SAMPLING, "triton", device_types=["cpu"],
                      factory=lambda ctx: Sleeper(0))  # fmt: skip
    sel = Selector(specs=[spec], backends={"triton": OK}, policy=PolicyState())
    r = tune_plans([CTX], TimingTable(), sel, TuneSettings(reps=1), "cpu")[0]
    assert r.measured == {} and "interpreter" in r.skipped["triton.sample"]


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"reps": -1}, "reps"),
        ({"reps": 0}, "reps"),
        ({"warmup": -2}, "warmup"),
        ({"ops": ["attention_decode", "nope"]}, "ops"),
        ({"ops": "sampling"}, "ops"),
        ({"ops": []}, "ops"),
        ({"force": 1}, "force"),
    ],
)
def test_bad_settings_name_the_parameter(kw, param):
    with pytest.raises(ValidationError) as e:
        TuneSettings(**kw)
    assert e.value.param == param and e.value.allowed


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"device": "tpu"}, "device"),
        ({"device": "not a device"}, "device"),
        ({"selector": "default"}, "selector"),
        ({"settings": {"reps": 3}}, "settings"),
        ({"progress": 5}, "progress"),
        ({"table": {}}, "table"),
        ({"plans": [Op.SAMPLING]}, "plans"),
    ],
)
def test_bad_tune_arguments_name_the_parameter(kw, param):
    args = {"plans": [CTX], "table": TimingTable(), "selector": _sel(), **kw}
    with pytest.raises(ValidationError) as e:
        tune_plans(**args)
    assert e.value.param == param


def test_unwritable_table_path_is_a_validation_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for bad in (blocker / "t.json", tmp_path, ""):
        with pytest.raises(ValidationError) as e:
            check_table_path(bad)
        assert e.value.param == "table_path"
    with pytest.raises(ValidationError, match="table_path"):
        tune_device([CTX], _sel(), path=blocker / "t.json", device="cpu")
    assert check_table_path(tmp_path / "new" / "t.json") == tmp_path / "new" / "t.json"


def test_engine_start_up_reads_the_device_table_and_can_tune(monkeypatch, tmp_path):
    from layerzero_serve.engine import Engine
    from layerzero_serve.selection import get_selector, probe_device, table_path

    eng = Engine(model="dummy:tiny", device="cpu", max_num_seqs=4)
    assert "no usable timing table" in get_selector().timing_source  # nothing measured yet
    plans = list(eng.runner.plans.values())  # decode, prefill, kv_write, sampling
    tune_device(plans, get_selector(), settings=TuneSettings(reps=2, warmup=0), device="cpu")
    path = table_path(probe_device("cpu"))
    assert path.parent == tmp_path / "timings" and path.exists()

    set_selector(None)  # a new process, as far as selection goes
    eng = Engine(model="dummy:tiny", device="cpu", max_num_seqs=4)
    assert str(path) in get_selector().timing_source
    rep = explain(eng.runner.plans[Op.ATTN_DECODE])
    chosen = next(c for c in rep.choice.candidates if c.chosen)
    assert chosen.name == "torch.paged_decode" and chosen.median_s > 0
    assert "median" in rep.text() and str(path) in rep.text()

    path.unlink()  # LZ_TUNE_AT_STARTUP=1: the engine measures its plans itself
    monkeypatch.setenv("LZ_TUNE_AT_STARTUP", "1")
    set_selector(None)
    Engine(model="dummy:tiny", device="cpu", max_num_seqs=4)
    assert len(read_table(path)) >= 4


def test_fp8_kv_plans_have_their_own_timing_keys():
    """Timings measured on a cache in the model's dtype never rank an FP8 cache's plans; the
    keys of "auto" plans keep their format (existing tables stay valid)."""
    auto = KernelContext(Op.ATTN_DECODE)
    fp8 = KernelContext(Op.ATTN_DECODE, kv_dtype="fp8_e4m3")
    assert context_key(auto) == "attention_decode|bfloat16|d128|h32/8|bs16|b1|q1|g0"
    assert context_key(fp8) == context_key(auto) + "|kvfp8_e4m3"
    assert context_key(KernelContext(Op.ATTN_DECODE, kv_dtype="fp8_e5m2")) != context_key(fp8)
