"""Bad input through the public Engine / LLM entry points and misbehaving proposers.

The contract: a bad argument raises a ValidationError (a ValueError) naming the parameter,
before anything is queued; a proposer failure (any method, any attribute, its rows) costs
drafts only; a failure part way through ``LLM.generate`` leaves the engine idle. In every case
the other requests still get exactly the tokens of a run that never saw the bad input, their
final outputs are delivered, and the KV pool has no block in use once all have ended."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from layerzero_serve import LLM
from layerzero_serve.engine import Engine
from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.spec_decode import Proposer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 8, 7, 6], [11, 12, 11, 12, 11], [3, 4, 5]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SMALL = {"device": "cpu", "seed": 0, "num_kv_blocks": 128, "max_num_seqs": 8}


def _engine(**kw) -> Engine:
    return Engine("dummy:tiny", **{**SMALL, **kw})


def _add_all(eng: Engine) -> list[str]:
    return [eng.add_request(p, GREEDY, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]


def _drain(eng: Engine, got: dict | None = None, finals: dict | None = None) -> dict:
    got = {} if got is None else got
    for _ in range(300):
        if not eng.has_unfinished():
            return got
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished and finals is not None:
                finals[o.request_id] = o.finish_reason
    raise AssertionError("the engine did not finish")


@pytest.fixture(scope="module")
def plain() -> dict[str, list[int]]:
    eng = _engine()
    _add_all(eng)
    return _drain(eng)


def _assert_idle(eng: Engine) -> None:
    assert not eng.has_unfinished()
    assert not eng.scheduler.requests
    kv = eng.stats()["kv_cache"]
    assert kv["used"] == 0 and kv["free"] + kv["cached"] == kv["num_blocks"]
    eng.kv_manager.check_integrity()


# ---- defect 1: huge max_tokens / min_tokens -------------------------------------------------


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"max_tokens": 2**63, "min_tokens": 2**63}, "max_tokens"),
        ({"max_tokens": 2**31, "min_tokens": 1}, "max_tokens"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"min_tokens": 2**63}, "min_tokens"),
    ],
)
def test_huge_token_counts_are_rejected_naming_the_field(kw, param):
    with pytest.raises(ValidationError, match=param) as ei:
        SamplingParams(**kw)
    # the range is in the message
    assert ("2147483647" if param == "max_tokens" else "[0, max_tokens=16]") in str(ei.value)


def test_the_largest_token_counts_run_and_leave_the_others_exact(plain):
    """max_tokens = min_tokens = 2**31 - 1 reach the sampler's int64 tables without overflow:
    the request runs until max_model_len, the others are untouched."""
    eng = _engine(max_model_len=40)
    top = 2**31 - 1
    _add_all(eng)
    eng.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=top, min_tokens=top))
    finals: dict[str, str] = {}
    got = _drain(eng, finals=finals)
    big = got.pop("0")
    assert len(big) == 40 - 3 and finals.pop("0") == "length"
    assert got == plain and set(finals.values()) == {"length"}
    _assert_idle(eng)


# ---- defect 1b: LLM.generate leaves no unfinished request when something raises -------------


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("dummy:tiny", **SMALL)


@pytest.mark.parametrize("where", ["step", "add_request"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_generate_aborts_its_requests_when_interrupted(llm, monkeypatch, where, exc):
    want = [r.token_ids for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    eng = llm.engine
    target = eng.runner if where == "step" else eng
    name = "execute" if where == "step" else "add_request"
    real = getattr(target, name)
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise exc("injected")
        return real(*a, **k)

    monkeypatch.setattr(target, name, flaky)
    with pytest.raises(exc, match="injected"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    monkeypatch.undo()
    _assert_idle(eng)
    assert not eng._children and not eng._prompt_lp
    # the next call works and gives the same tokens
    assert [r.token_ids for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want


# ---- defect 2: misbehaving proposers cost drafts only ---------------------------------------


class _Raises:
    def __index__(self):
        raise ValueError("bad __index__")


class _BadIter:
    """Yields one good id, then raises ValueError."""

    def __init__(self, tok: int) -> None:
        self.tok = tok

    def __iter__(self):
        yield self.tok
        raise ValueError("bad row iteration")


class Hostile(Proposer):
    """Good drafts (the last token repeated) except where ``mode`` misbehaves."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def propose(self, requests_tokens, k, request_ids=None):
        if self.mode == "propose_base":
            raise LookupError("propose broke")
        rows = []
        for toks, rid in zip(requests_tokens, request_ids, strict=True):
            good = [toks[-1]] * k
            if rid == "r1" and self.mode == "row_iter":
                rows.append(_BadIter(toks[-1]))
            elif rid == "r1" and self.mode == "index":
                rows.append([toks[-1], _Raises()])
            elif rid == "r1" and self.mode == "first_index":
                rows.append([_Raises()])
            else:
                rows.append(good)
        return rows

    def release(self, request_id: str) -> None:
        if self.mode == "release":
            raise RuntimeError(f"release({request_id}) broke")

    @property
    def name(self):  # type: ignore[override]
        if self.mode == "name":
            raise RuntimeError("name broke")
        return "hostile"

    @property
    def probe_without_ids(self):  # type: ignore[override]
        if self.mode == "probe":
            raise RuntimeError("probe_without_ids broke")
        return False


class NoSignature(Proposer):
    """``propose`` is an attribute whose read raises: at construction and at every call."""

    name = "no-signature"

    @property
    def propose(self):  # type: ignore[override]
        raise RuntimeError("no propose today")


MODES = ["release", "row_iter", "index", "first_index", "name", "probe", "propose_base"]


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed_k", "adaptive"])
@pytest.mark.parametrize("mode", MODES)
def test_any_proposer_failure_costs_drafts_only(plain, mode, adaptive, caplog):
    eng = _engine(speculative_method=Hostile(mode), adaptive_speculation=adaptive)
    _add_all(eng)
    finals: dict[str, str] = {}
    got = _drain(eng, finals=finals)
    assert got == plain
    assert finals == dict.fromkeys(plain, "length")  # every final output was delivered
    stats = eng.stats()
    spec = stats["speculative"]
    if mode in ("release", "row_iter", "index", "first_index", "propose_base"):
        assert spec["proposer_errors"] > 0
        assert "failed" in caplog.text
    if mode == "release":
        assert spec["proposer_errors"] == len(PROMPTS)  # one per finished request
    if mode == "name":
        assert spec["method"] == "Hostile"
    if not adaptive and mode in ("row_iter", "index", "first_index", "release", "probe"):
        assert spec["drafts"] > 0  # the other requests (or all, for release) did speculate
    _assert_idle(eng)


def test_a_proposer_without_a_readable_propose(plain, caplog):
    eng = _engine(speculative_method=NoSignature(), adaptive_speculation=False)
    _add_all(eng)
    assert _drain(eng) == plain
    assert eng.stats()["speculative"]["proposer_errors"] > 1
    _assert_idle(eng)


def test_abort_with_a_raising_release_still_reports_the_abort(plain):
    eng = _engine(speculative_method=Hostile("release"), adaptive_speculation=False)
    _add_all(eng)
    got = {o.request_id: list(o.new_token_ids) for o in eng.step()}
    assert eng.abort("r2")
    finals: dict[str, str] = {}
    _drain(eng, got, finals)
    assert finals["r2"] == "abort"
    assert {k: v for k, v in got.items() if k != "r2"} == {
        k: v for k, v in plain.items() if k != "r2"
    }
    _assert_idle(eng)


# ---- defect 4: Engine's positional argument --------------------------------------------------


def test_engine_takes_a_model_positionally(plain, default_model_dir):
    eng = _engine()  # "dummy:tiny" given positionally
    assert eng.config.model == "dummy:tiny"
    _add_all(eng)
    assert _drain(eng) == plain
    eng = Engine(default_model_dir, device="cpu", num_kv_blocks=32)  # a path
    assert eng.config.model == str(default_model_dir)


def test_engine_default_positionally(lz_cache):
    eng = Engine("default", device="cpu", num_kv_blocks=32)
    assert eng.config.model == "default"
    rid = eng.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=2))
    assert rid in _drain(eng)


@pytest.mark.parametrize(
    "args,kwargs,param",
    [
        ((5,), {}, "config"),
        ((b"dummy:tiny",), {}, "config"),
        ((["dummy:tiny"],), {}, "config"),
        (("dummy:tiny",), {"model": "dummy:tiny"}, "model"),
        ((), {"model": "dummy:tiny", "max_num_sqs": 4}, "max_num_sqs"),
        ((), {"model": None}, "model"),
        (("dummy:tiny",), {"seed": 2**63}, "seed"),
        (("dummy:tiny",), {"max_num_seqs": 2**64}, "max_num_seqs"),
    ],
)
def test_engine_constructor_names_the_bad_argument(args, kwargs, param):
    with pytest.raises(ValidationError, match=param):
        Engine(*args, **kwargs)


# ---- defect 5: KV block counts in stats ------------------------------------------------------


def test_stats_count_kv_blocks_and_nothing_leaks(plain):
    eng = _engine()
    kv = eng.stats()["kv_cache"]
    assert kv == {"num_blocks": 127, "free": 127, "cached": 0, "used": 0}
    _add_all(eng)
    got = {o.request_id: list(o.new_token_ids) for o in eng.step()}
    kv = eng.stats()["kv_cache"]
    assert kv["used"] > 0 and kv["free"] + kv["cached"] + kv["used"] == 127
    eng.abort("r0")
    got = _drain(eng, got)
    assert {k: got[k] for k in ("r1", "r2", "r3")} == {k: plain[k] for k in ("r1", "r2", "r3")}
    kv = eng.stats()["kv_cache"]
    assert kv["used"] == 0 and kv["cached"] > 0  # prompts' full blocks stay in the prefix cache
    assert kv["free"] + kv["cached"] == 127
    _assert_idle(eng)


# ---- every other entry point: fuzzed arguments -----------------------------------------------

V = 512  # dummy:tiny's vocabulary


def _add_cases() -> list[tuple[str, tuple, dict, str]]:
    p = [1, 2, 3]
    cases = [
        ("prompt_str", ("abc",), {}, "prompt"),  # text, but this model has no tokenizer
        ("prompt_bytes", (b"ab",), {}, "prompt_token_ids"),
        ("prompt_int", (5,), {}, "prompt_token_ids"),
        ("prompt_none", (None,), {}, "prompt_token_ids"),
        ("prompt_empty", ([],), {}, "prompt_token_ids"),
        ("prompt_array", (np.array([1, 2]),), {}, "prompt_token_ids"),
        ("prompt_tensor", (torch.tensor([1, 2]),), {}, "prompt_token_ids"),
        ("prompt_nested", ([[1, 2]],), {}, "prompt_token_ids"),
        ("prompt_dict", ({1: 2},), {}, "prompt_token_ids"),
    ]
    for name, tok in [("neg", -1), ("vocab", V), ("2**31", 2**31), ("2**63", 2**63),
                      ("2**64", 2**64), ("float", 1.5), ("nan", math.nan), ("bool", True),
                      ("str", "a"), ("none", None)]:  # fmt: skip
        cases.append((f"prompt_id_{name}", ([1, tok],), {}, "prompt_token_ids"))
    for name, params in [("str", "greedy"), ("dict", {"temperature": 0}), ("int", 5)]:
        cases.append((f"params_{name}", (p, params), {}, "params"))
    for field in ("stop_token_ids", "allowed_token_ids", "bad_token_ids"):
        cases.append((f"{field}_vocab", (p, SamplingParams(**{field: [V]})), {}, field))
    cases.append(("logit_bias_vocab", (p, SamplingParams(logit_bias={V: 1.0})), {}, "logit_bias"))
    for name, value in [("int", 5), ("bytes", b"r"), ("list", ["r"]), ("none_ok", None)][:3]:
        cases.append((f"request_id_{name}", (p,), {"request_id": value}, "request_id"))
    for name, value in [("2**31", 2**31), ("2**63", 2**63), ("-2**63", -(2**63)),
                        ("2**64", 2**64), ("float", 1.0), ("nan", math.nan), ("str", "1"),
                        ("bool", True), ("none", None)]:  # fmt: skip
        cases.append((f"priority_{name}", (p,), {"priority": value}, "priority"))
    for name, value in [("int", 5), ("bytes", b"s"), ("list", ["s"])]:
        cases.append((f"cache_salt_{name}", (p,), {"cache_salt": value}, "cache_salt"))
    return cases


ADD_CASES = _add_cases()


@pytest.fixture(scope="module")
def running(plain):
    """An engine with the reference batch part way through (2 steps in)."""
    eng = _engine(policy="priority")
    _add_all(eng)
    got: dict[str, list[int]] = {}
    for _ in range(2):
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return eng, got


def _live_state(eng: Engine) -> tuple:
    return (
        sorted(eng.scheduler.requests),
        len(eng.scheduler.waiting),
        len(eng.scheduler.running),
        eng.stats()["kv_cache"],
        dict(eng._children),
    )


@pytest.mark.parametrize(("args", "kwargs", "param"), [c[1:] for c in ADD_CASES],
                         ids=[c[0] for c in ADD_CASES])  # fmt: skip
def test_add_request_names_the_bad_argument_and_queues_nothing(running, args, kwargs, param):
    eng, _ = running
    before = _live_state(eng)
    with pytest.raises(ValidationError, match=param):
        eng.add_request(*args, **kwargs)
    assert _live_state(eng) == before


@pytest.mark.parametrize("rid", [None, 5, ["r0"], b"r0", {"r0"}])
def test_abort_names_request_id_and_aborts_nothing(running, rid):
    eng, _ = running
    before = _live_state(eng)
    with pytest.raises(ValidationError, match="request_id"):
        eng.abort(rid)
    assert _live_state(eng) == before


def test_the_batch_that_saw_all_the_bad_calls_is_exact(running, plain):
    """Runs after the fuzz cases above (same module-scoped engine): its tokens are the
    reference's, and nothing leaked."""
    eng, got = running
    _drain(eng, got)
    assert got == plain
    _assert_idle(eng)


@pytest.mark.parametrize(
    "call,param",
    [
        (lambda m: m.decode([-1]), "token_ids"),
        (lambda m: m.decode([2**64]), "token_ids"),
        (lambda m: m.decode([2**63]), "token_ids"),
        (lambda m: m.decode([V]), "token_ids"),
        (lambda m: m.decode([1.5]), "token_ids"),
        (lambda m: m.decode("abc"), "token_ids"),
        (lambda m: m.decode(None), "token_ids"),
        (lambda m: m.decode(5), "token_ids"),
        (lambda m: m.encode(5), "text"),
        (lambda m: m.encode(None), "text"),
        (lambda m: m.encode(b"x"), "text"),
        (lambda m: m.generate(None), "prompts"),
        (lambda m: m.generate(5), "prompts"),
        (lambda m: m.generate(b"abc"), "prompts"),
        (lambda m: m.generate([[1, -1]]), "prompt_token_ids"),
        (lambda m: m.generate([[1, 2**64]]), "prompt_token_ids"),
        (lambda m: m.generate([1, 2**63]), "prompt_token_ids"),
        (lambda m: m.generate([[]]), "prompt_token_ids"),
        (lambda m: m.generate([[1.5]]), "prompt"),
        (lambda m: m.generate([None]), "prompts"),
        (lambda m: m.generate([[1, 2]], "greedy"), "sampling_params"),
        (lambda m: m.generate([[1, 2]], [GREEDY, GREEDY]), "sampling_params"),
        (lambda m: m.generate([[1, 2]], [None]), "sampling_params"),
        (lambda m: m.generate([[1, 2]], SamplingParams(stop_token_ids=[V])), "stop_token_ids"),
        (lambda m: m.generate([[1, 2]], use_tqdm="yes"), "use_tqdm"),
        (lambda m: LLM(None), "model"),
        (lambda m: LLM(5), "model"),
        (lambda m: LLM("dummy:tiny", max_num_sqs=2), "max_num_sqs"),
        (lambda m: LLM("dummy:tiny", config=None), "config"),
    ],
)
def test_llm_entry_points_name_the_bad_argument(llm, call, param):
    with pytest.raises(ValidationError, match=param):
        call(llm)
    _assert_idle(llm.engine)


def test_llm_decode_accepts_valid_ids(llm):
    assert llm.decode([1, 2]) is None  # dummy:tiny has no tokenizer
    assert llm.decode(np.array([1, 2])) is None
