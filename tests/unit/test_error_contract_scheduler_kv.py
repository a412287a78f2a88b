"""Bad input through the public scheduler, KV cache manager and SamplingParams entry points:
every call raises a ValidationError (a ValueError) naming the parameter, and changes nothing;
the requests already there go on to produce exactly the tokens of a run that never saw it."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.types import Request

BS = 4
HUGE = [2**31, 2**63, 2**64, -(2**63) - 1]
NOT_INTS = [1.5, math.nan, math.inf, "3", None, [], True]


def _next_token(ids: list[int]) -> int:
    return (sum(ids) * 31 + len(ids)) % 97


def _runner(out) -> list[list[int]]:
    """A deterministic 'model': a row that reaches the end of its tokens samples one."""
    return [
        [_next_token(r.all_token_ids)] if s + n >= len(r.all_token_ids) else []
        for r, s, n in zip(out.requests, out.starts, out.num_scheduled, strict=True)
    ]


def _make(num_blocks: int = 64, **cfg) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens=8, **cfg), KVCacheManager(num_blocks, BS)
    )


def _requests() -> list[Request]:
    return [Request(f"r{i}", [(7 * i + j) % 50 for j in range(5 + 3 * i)], 6) for i in range(3)]


def _drain(sched: Scheduler) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    for _ in range(500):
        if not sched.has_unfinished():
            return got
        out = sched.schedule()
        for o in sched.update(out, _runner(out)):
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        sched.kv.check_integrity()
    raise AssertionError("did not finish")


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    sched = _make()
    for r in _requests():
        sched.add_request(r)
    return _drain(sched)


def _snapshot(sched: Scheduler) -> tuple:
    kv = sched.kv
    reqs = tuple(
        (
            rid,
            r.status,
            r.num_computed_tokens,
            tuple(r.all_token_ids),
            tuple(kv.block_ids(rid)),
            None if r.block_table is None else r.block_table.capacity,
        )
        for rid, r in sorted(sched.requests.items())
    )
    blocks = tuple((b.block_id, b.ref_cnt, b.block_hash) for b in kv.pool.blocks)
    return (
        reqs,
        blocks,
        kv.num_free_blocks,
        len(sched.waiting),
        len(sched.running),
        len(sched._finished_unreported),
    )


# ---- Scheduler.update: all rows are checked before any is applied ---------------------------


def _bad_rows(out) -> dict[str, object]:
    good = _runner(out)
    return {
        "fewer": good[:-1],
        "more": [*good, [1]],
        "none": None,
        "str": "abc",
        "row_str": [*good[:-1], "x"],
        "row_int": [*good[:-1], 5],
        "negative": [*good[:-1], [-1]],
        "huge": [*good[:-1], [2**64]],
        "float": [*good[:-1], [1.5]],
        "bool": [*good[:-1], [True]],
        "nan": [*good[:-1], [math.nan]],
        "row_none": [*good[:-1], None],
    }


@pytest.mark.parametrize("check_rows", [True, False])
def test_update_with_fewer_rows_raises_naming_the_rows_and_changes_nothing(reference, check_rows):
    sched = _make()
    for r in _requests():
        sched.add_request(r)
    out = sched.schedule()
    assert len(out.requests) >= 2
    before = _snapshot(sched)
    with pytest.raises(ValidationError, match="new_token_ids") as ei:
        # row 0 is fine: it must not be applied either (the count is checked even when the
        # caller vouches for the rows' contents)
        sched.update(out, _runner(out)[:-1], check_rows=check_rows)
    assert "exactly one per scheduled request" in str(ei.value)
    assert _snapshot(sched) == before
    streamed: dict[str, list[int]] = {}
    for o in sched.update(out, _runner(out)):  # the same step, applied properly
        streamed.setdefault(o.request_id, []).extend(o.new_token_ids)
    for rid, toks in _drain(sched).items():
        streamed.setdefault(rid, []).extend(toks)
    assert streamed == reference


BAD_ROW_CASES = [
    "fewer", "more", "none", "str", "row_str", "row_int", "negative", "huge", "float", "bool",
    "nan", "row_none",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_ROW_CASES)
def test_update_with_a_bad_row_changes_nothing_and_the_run_goes_on(reference, case):
    sched = _make()
    for r in _requests():
        sched.add_request(r)
    streamed: dict[str, list[int]] = {}
    for _ in range(3):  # a few steps in: decodes and prefills mixed
        out = sched.schedule()
        for o in sched.update(out, _runner(out)):
            streamed.setdefault(o.request_id, []).extend(o.new_token_ids)
    out = sched.schedule()
    assert len(out.requests) >= 2
    before = _snapshot(sched)
    with pytest.raises(ValidationError, match="new_token_ids"):
        sched.update(out, _bad_rows(out)[case])
    assert _snapshot(sched) == before
    for o in sched.update(out, _runner(out)):
        streamed.setdefault(o.request_id, []).extend(o.new_token_ids)
    for rid, toks in _drain(sched).items():
        streamed.setdefault(rid, []).extend(toks)
    assert streamed == reference
    assert sched.kv.block_usage()["used"] == 0


@pytest.mark.parametrize("output", [None, "x", 3, {}, []])
def test_update_rejects_an_output_that_is_not_a_schedule(output):
    sched = _make()
    sched.add_request(_requests()[0])
    before = _snapshot(sched)
    with pytest.raises(ValidationError, match="output"):
        sched.update(output, [])
    assert _snapshot(sched) == before


def test_step_with_a_runner_returning_too_few_rows_applies_nothing(reference):
    sched = _make()
    for r in _requests():
        sched.add_request(r)
    with pytest.raises(ValidationError, match="runner"):
        sched.step(lambda out: _runner(out)[:-1])
    with pytest.raises(ValidationError, match="runner"):
        sched.step("not callable")
    # the failed step scheduled rows but applied none: the run still matches the reference
    assert _drain(sched) == reference


# ---- Scheduler.add_request / abort / schedule -----------------------------------------------


def _req(**kw):
    """A bad request, built inside the test: its description validates on construction."""
    base = dict(request_id="bad", prompt_token_ids=[1, 2, 3], max_tokens=4)
    base.update(kw)
    return functools.partial(Request, **base)


BAD_REQUESTS = [
    ("request", "x"),
    ("request", None),
    ("request", {"request_id": "a"}),
    ("request_id", _req(request_id=5)),
    ("max_tokens", _req(max_tokens=2**63)),
    ("max_tokens", _req(max_tokens=2**31)),
    ("max_tokens", _req(max_tokens=0)),
    ("max_tokens", _req(max_tokens=2.0)),
    ("prompt_token_ids", _req(prompt_token_ids=[])),
    ("prompt_token_ids", _req(prompt_token_ids=[1, -1])),
    ("prompt_token_ids", _req(prompt_token_ids=[1, 2**40])),
    ("prompt_token_ids", _req(prompt_token_ids=[1, 2**64])),
    ("prompt_token_ids", _req(prompt_token_ids=[1.0])),
    ("prompt_token_ids", _req(prompt_token_ids=[True])),
    ("prompt_token_ids", _req(prompt_token_ids="abc")),
    ("priority", _req(priority=2**63)),
    ("priority", _req(priority=-(2**31))),
    ("priority", _req(priority=1.5)),
    ("eos_token_id", _req(eos_token_id=-1)),
    ("eos_token_id", _req(eos_token_id=2**64)),
    ("stop_token_ids", _req(stop_token_ids=frozenset({-3}))),
    ("stop_token_ids", _req(stop_token_ids=frozenset({"a"}))),
    ("stop_token_ids", _req(stop_token_ids=5)),
    ("ignore_eos", _req(ignore_eos=1)),
    ("cache_salt", _req(cache_salt=5)),
    ("adapter_id", _req(adapter_id=2**64)),
]


@pytest.mark.parametrize(("param", "request_"), BAD_REQUESTS, ids=[p for p, _ in BAD_REQUESTS])
def test_add_request_rejects_bad_requests_and_queues_nothing(reference, param, request_):
    sched = _make()
    for r in _requests():
        sched.add_request(r)
    before = _snapshot(sched)
    with pytest.raises(ValidationError, match=param):
        # (a description field out of range raises when the request is built)
        sched.add_request(request_() if isinstance(request_, functools.partial) else request_)
    assert _snapshot(sched) == before
    assert _drain(sched) == reference


@pytest.mark.parametrize("prompt", [5, None, 1.5, np.array(3), object()])
def test_a_request_with_a_non_iterable_prompt_names_it(prompt):
    with pytest.raises(ValidationError, match="prompt_token_ids"):
        Request("x", prompt, max_tokens=3)


def test_add_request_rejects_a_scalar_array_of_stop_ids():
    sched = _make()
    with pytest.raises(ValidationError, match="stop_token_ids"):
        sched.add_request(_req(stop_token_ids=np.array(3))())
    assert not sched.requests and not sched.has_unfinished()


@pytest.mark.parametrize("rid", [None, 5, [], {}, b"r0"])
def test_abort_and_fail_reject_non_str_ids(rid):
    sched = _make()
    sched.add_request(_requests()[0])
    before = _snapshot(sched)
    with pytest.raises(ValidationError, match="request_id"):
        sched.abort(rid)
    with pytest.raises(ValidationError, match="request_id"):
        sched.fail(rid, "x")
    assert _snapshot(sched) == before


@pytest.mark.parametrize("lookahead", [-1, 1, 2**63, 1.0, "0", True])
def test_schedule_rejects_bad_lookahead(lookahead):
    sched = _make()
    sched.add_request(_requests()[0])
    before = _snapshot(sched)
    with pytest.raises(ValidationError, match="lookahead"):
        sched.schedule(lookahead)
    assert _snapshot(sched) == before


def test_schedule_next_decode_rejects_a_non_schedule():
    with pytest.raises(ValidationError, match="prev"):
        _make().schedule_next_decode("x")


# ---- KVCacheManager -------------------------------------------------------------------------


def _kv_with_request() -> tuple[KVCacheManager, Request]:
    mgr = KVCacheManager(16, BS)
    r = Request("a", list(range(10)), max_tokens=4)
    assert mgr.allocate_slots(r, 10, None, 4) is not None  # 14 slots: 4 blocks, lookahead too
    r.num_computed_tokens = 10
    return mgr, r


def _kv_state(mgr: KVCacheManager, r: Request) -> tuple:
    return (
        tuple(mgr.block_ids("a")),
        mgr.block_ids("a").capacity if mgr.block_ids("a") else 0,
        mgr.num_free_blocks,
        mgr.table_edits,
        tuple(b.ref_cnt for b in mgr.pool.blocks),
    )


@pytest.mark.parametrize("num_tokens", [-5, -1, 2.5, *HUGE, *NOT_INTS, np.float32(3)])
def test_trim_rejects_bad_counts_and_frees_nothing(num_tokens):
    mgr, r = _kv_with_request()
    before = _kv_state(mgr, r)
    with pytest.raises(ValidationError, match="num_tokens") as ei:
        mgr.trim(r, num_tokens)
    assert "[0, 2147483647]" in str(ei.value)
    assert _kv_state(mgr, r) == before
    mgr.check_integrity()
    mgr.trim(r, np.int64(10))  # NumPy integers are fine
    assert len(mgr.block_ids("a")) == 3


def _calls(mgr: KVCacheManager, r: Request) -> list:
    """(method, args, param) of bad calls."""
    return [
        ("allocate_slots", ("x", 3), "request"),
        ("allocate_slots", (None, 3), "request"),
        ("allocate_slots", ({"request_id": "a"}, 3), "request"),
        ("allocate_slots", (r, 2**63), "num_new_tokens"),
        ("allocate_slots", (r, 2**64), "num_new_tokens"),
        ("allocate_slots", (r, 2**31), "num_new_tokens"),
        ("allocate_slots", (r, 1, None, 2**63), "num_lookahead_tokens"),
        ("allocate_slots", (r, 1, None, math.nan), "num_lookahead_tokens"),
        ("allocate_slots", (r, 1, "prefix"), "prefix"),
        ("allocate_slots", (r, 1, [1, 2]), "prefix"),
        ("free", ("a",), "request"),
        ("free", (None,), "request"),
        ("commit", ("a",), "request"),
        ("match_prefix", ("a",), "request"),
        ("match_prefix", (r, "yes"), "record_stats"),
        ("trim", ("a", 3), "request"),
        ("fork", ("a", Request("c", [1], 1)), "parent"),
        ("fork", (r, "c"), "child"),
        ("block_ids", ([],), "request_id"),
        ("block_ids", (5,), "request_id"),
        ("blocks_needed", (-1,), "num_tokens"),
        ("blocks_needed", (2.5,), "num_tokens"),
        ("blocks_needed", (2**64,), "num_tokens"),
        ("blocks_needed", ("3",), "num_tokens"),
        ("record_prefix_lookup", (-1, 0), "num_tokens"),
        ("record_prefix_lookup", (4, 5), "num_hit_tokens"),
        ("record_prefix_lookup", (4, math.nan), "num_hit_tokens"),
    ]


@pytest.mark.parametrize("i", range(len(_calls(*_kv_with_request()))))
def test_kv_manager_methods_reject_bad_arguments_and_change_nothing(i):
    mgr, r = _kv_with_request()
    name, args, param = _calls(mgr, r)[i]
    before = (_kv_state(mgr, r), mgr.stats.queries, mgr.stats.hits)
    with pytest.raises(ValidationError, match=param):
        getattr(mgr, name)(*args)
    assert (_kv_state(mgr, r), mgr.stats.queries, mgr.stats.hits) == before
    mgr.check_integrity()


def test_block_usage_adds_up_and_returns_to_zero_used():
    mgr = KVCacheManager(32, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), mgr)
    total = mgr.num_usable_blocks
    for r in _requests():
        sched.add_request(r)
    seen_used = 0
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, _runner(out))
        u = mgr.block_usage()
        assert u["num_blocks"] == total
        assert u["free"] + u["cached"] + u["used"] == total
        held = {b.block_id for blocks in mgr.owned_blocks().values() for b in blocks}
        assert u["used"] == len(held)
        seen_used = max(seen_used, u["used"])
    assert seen_used > 0
    u = mgr.block_usage()
    assert u["used"] == 0 and u["cached"] > 0  # the prompts' full blocks stay cached
    assert u["free"] + u["cached"] == total


# ---- SamplingParams: huge ints and non-ints for every integer field -------------------------

INT_FIELDS = ["n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"]


def _int_field_cases() -> list[tuple[str, object]]:
    cases = []
    for field in INT_FIELDS:
        for value in [*HUGE, 1.5, math.nan, math.inf, "3", None]:
            if field == "seed" and value == 2**31:
                continue  # a valid int64 seed
            if field in ("seed", "logprobs", "prompt_logprobs") and value is None:
                continue  # None = off / unseeded
            cases.append((field, value))
    return cases


@pytest.mark.parametrize(("field", "value"), _int_field_cases())
def test_every_int_field_rejects_huge_and_non_int_values(field, value):
    kw = {field: value}
    if field == "min_tokens" and isinstance(value, int) and value > 0:
        kw["max_tokens"] = min(value, 2**31 - 1)
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**kw)


@pytest.mark.parametrize("big", HUGE)
@pytest.mark.parametrize("field", ["stop_token_ids", "allowed_token_ids", "bad_token_ids"])
def test_token_id_fields_reject_ids_beyond_int32(field, big):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**{field: [1, big]})


@pytest.mark.parametrize("big", HUGE)
def test_logit_bias_rejects_huge_keys(big):
    with pytest.raises(ValidationError, match="logit_bias"):
        SamplingParams(logit_bias={big: 1.0})


def test_the_documented_maxima_are_accepted():
    top = 2**31 - 1
    p = SamplingParams(max_tokens=top, min_tokens=top, top_k=top, stop_token_ids=[top])
    assert (p.max_tokens, p.min_tokens, p.top_k) == (top, top, top)
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)


@pytest.mark.parametrize("mode", [["raw"], np.array(["raw"]), None, 1, "RAW"])
def test_logprobs_mode_rejects_non_strings(mode):
    with pytest.raises(ValidationError, match="logprobs_mode"):
        SamplingParams(logprobs=1, logprobs_mode=mode)


def test_a_raising_iterable_of_ids_is_a_validation_error():
    def ids():
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValidationError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=ids())
