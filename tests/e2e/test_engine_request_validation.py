"""Request-level inputs of Engine.add_request / abort and LLM.generate: bad values raise a
ValidationError naming the parameter before anything is queued, so one bad request never
stalls or poisons the engine for the others; ids (given, generated, of n > 1 samples) never
collide and become free again."""

from __future__ import annotations

import numpy as np
import pytest

from layerzero_serve import LLM, SamplingParams
from layerzero_serve.engine import Engine
from layerzero_serve.errors import ValidationError

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = SamplingParams(temperature=0.0, max_tokens=3)


@pytest.fixture(scope="module")
def engine():
    return Engine(model="dummy:tiny", device="cpu", seed=0, policy="priority")


def _drain(eng) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return got


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"cache_salt": 123}, "cache_salt"),
        ({"priority": "x"}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 2**40}, "priority"),
        ({"request_id": 7}, "request_id"),
    ],
)
def test_bad_request_inputs_raise_and_queue_nothing(engine, kwargs, param):
    prompt = list(range(3, 43))  # more than one full block: the salt would be hashed
    with pytest.raises(ValidationError, match=param):
        engine.add_request(prompt, GREEDY, **kwargs)
    assert not engine.has_unfinished()
    good = engine.add_request(prompt, GREEDY)  # the engine still serves
    assert len(_drain(engine)[good]) == 3


def test_abort_takes_a_str(engine):
    with pytest.raises(ValidationError, match="request_id"):
        engine.abort(["x"])
    assert engine.abort("never-added") is False


def test_n_samples_are_queued_all_or_none_and_their_id_frees_up(engine):
    engine.add_request([1, 2], GREEDY, request_id="c#1")
    with pytest.raises(ValidationError, match="request_id"):
        engine.add_request([1, 2], SamplingParams(n=3, max_tokens=3), request_id="c")
    assert sorted(engine.scheduler.requests) == ["c#1"]  # no c#0 slipped in
    _drain(engine)
    engine.add_request([1, 2], SamplingParams(n=2, max_tokens=3), request_id="b")
    assert set(_drain(engine)) == {"b#0", "b#1"}
    assert "b" not in engine._children  # nothing kept per ended request
    assert engine.add_request([1, 2], GREEDY, request_id="b") == "b"  # free again
    _drain(engine)


def test_generated_ids_skip_ids_the_caller_chose(engine):
    nxt = str(int(engine.add_request([5], GREEDY)) + 1)
    engine.add_request([5], GREEDY, request_id=nxt)
    generated = engine.add_request([5], GREEDY)
    assert generated != nxt and len(set(_drain(engine))) == 3


def test_aborted_n_samples_free_their_id(engine):
    engine.add_request([1, 2, 3], SamplingParams(n=3, max_tokens=30), request_id="ab")
    engine.step()
    assert engine.abort("ab") is True
    _drain(engine)
    assert engine.add_request([1], GREEDY, request_id="ab") == "ab"
    _drain(engine)


@pytest.fixture(scope="module")
def llm():
    return LLM(model="dummy:tiny", device="cpu", seed=0)


@pytest.mark.parametrize(
    "prompts,param",
    [(None, "prompts"), (5, "prompts"), ([None], "prompts[0]"), ([[1, 2], 7], "prompts[1]")],
)
def test_generate_rejects_bad_prompts(llm, prompts, param):
    with pytest.raises(ValidationError, match=param.replace("[", r"\[")):
        llm.generate(prompts, GREEDY, use_tqdm=False)


@pytest.mark.parametrize("params", [[{"temperature": 0.0}], [None], "x", 5])
def test_generate_rejects_bad_sampling_params(llm, params):
    with pytest.raises(ValidationError, match="sampling_params"):
        llm.generate(["hi"], params, use_tqdm=False)


def test_generate_needs_an_idle_engine(llm):
    rid = llm.engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(ValidationError, match="engine"):
        llm.generate(["hi"], GREEDY, use_tqdm=False)
    llm.engine.abort(rid)
    while llm.engine.has_unfinished():
        llm.engine.step()
    (res,) = llm.generate([np.arange(1, 4).tolist()], GREEDY, use_tqdm=False)
    assert len(res.outputs[0].token_ids) == 3


@pytest.mark.parametrize(
    "field,value",
    [("request_id", 5), ("prompt_token_ids", []), ("prompt_token_ids", [1, -2]),
     ("prompt_token_ids", [1, "a"]), ("priority", "x")],
)  # fmt: skip
def test_scheduler_validates_a_request_before_queueing_it(field, value):
    from layerzero_serve.kv_cache import KVCacheManager
    from layerzero_serve.scheduler import Scheduler, SchedulerConfig
    from layerzero_serve.types import Request

    sched = Scheduler(SchedulerConfig(4, 64, 128), KVCacheManager(32, 16))
    fields = {"request_id": "r", "prompt_token_ids": [1, 2, 3], "max_tokens": 4, field: value}
    with pytest.raises(ValidationError, match=field):
        sched.add_request(Request(**fields))
    assert not sched.requests and not sched.has_unfinished()


def test_scheduler_checks_its_parts_and_the_runners_rows():
    from layerzero_serve.kv_cache import KVCacheManager
    from layerzero_serve.scheduler import Scheduler, SchedulerConfig
    from layerzero_serve.types import Request

    with pytest.raises(ValidationError, match="kv"):
        Scheduler(SchedulerConfig(4, 64, 128), None)
    with pytest.raises(ValidationError, match="config"):
        Scheduler({"max_num_seqs": 4}, KVCacheManager(32, 16))
    sched = Scheduler(SchedulerConfig(4, 64, 128), KVCacheManager(32, 16))
    sched.add_request(Request(request_id="r", prompt_token_ids=[1, 2, 3], max_tokens=4))
    with pytest.raises(ValidationError, match="runner"):
        sched.step(lambda out: [])  # no row for the scheduled request
