"""``Scheduler.schedule_next_decode`` (async scheduling's scheduler half, pure CPU): the step
after a decode step, scheduled before that step's tokens are applied. Driven like the engine
drives it (step N+1 computed with N's token fed in, then N applied, then N+1), every request
gets exactly the tokens of a cache-free reference, EOS stops and an abort inside the pipeline
included; the KV manager stays consistent and nothing leaks; it declines whenever the next step
is not the plain continuation."""

from __future__ import annotations

from fake_model import FakeModel, reference_output

from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.types import Request

BS = 4


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 31 + i * 7 + 3) % 97 for i in range(n)]


def _make(num_blocks=96, **cfg):
    kv = KVCacheManager(num_blocks, BS)
    return Scheduler(SchedulerConfig(**cfg), kv), kv, FakeModel(num_blocks, BS)


def _ahead(model, nxt, toks):
    """Compute ``nxt`` as the device does: each row's input is the previous step's token."""
    for r, t in zip(nxt.requests, toks, strict=True):
        r.all_token_ids.append(t[0])
    got = model(nxt)
    for r in nxt.requests:
        r.all_token_ids.pop()
    return got


def _run_pipelined(sched, kv, model, abort_at=None):
    outputs: dict[str, list[int]] = {}
    pending, step, launched = None, 0, 0
    while sched.has_unfinished() or pending is not None:
        if pending is None:
            out = sched.schedule()
            toks = model(out) if out.requests else []
        else:
            out, toks = pending
            pending = None
        nxt = sched.schedule_next_decode(out) if out.requests else None
        if nxt is not None:
            assert nxt.starts == [s + 1 for s in out.starts] and nxt.requests == out.requests
            pending = (nxt, _ahead(model, nxt, toks))
            launched += 1
        if abort_at is not None and step == abort_at[0]:
            sched.abort(abort_at[1])
        for o in sched.update(out, toks):
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
        kv.check_integrity()
        step += 1
    assert kv.pool.num_free == kv.num_usable_blocks  # every block came back
    return outputs, launched


def test_pipelined_steps_give_the_reference_tokens_with_stops_and_an_abort():
    sched, kv, model = _make(max_num_seqs=8, max_num_batched_tokens=64)
    eos = 11
    specs = [(5, 0, 30), (9, 1, 22), (2, 2, 40), (14, 3, 17), (7, 4, 35), (3, 5, 28)]
    for i, (n, seed, max_tokens) in enumerate(specs):
        sched.add_request(
            Request(str(i), _prompt(n, seed), max_tokens=max_tokens, eos_token_id=eos)
        )
    outputs, launched = _run_pipelined(sched, kv, model, abort_at=(12, "4"))
    for i, (n, seed, max_tokens) in enumerate(specs):
        want = reference_output(model, _prompt(n, seed), max_tokens, eos=eos)
        if str(i) == "4":
            assert outputs["4"] == want[: len(outputs["4"])] and len(outputs["4"]) < len(want)
        else:
            assert outputs[str(i)] == want, i
    assert any(outputs[str(i)][-1] == eos for i in range(6))  # an EOS stop in the pipeline
    assert launched > 20


def test_declines_when_the_next_step_is_not_the_plain_continuation():
    sched, kv, model = _make(max_num_seqs=4, max_num_batched_tokens=64)
    sched.add_request(Request("a", _prompt(6, 0), max_tokens=2))
    sched.add_request(Request("b", _prompt(3, 1), max_tokens=50))
    out = sched.schedule()  # prefill of both (rows of 6 and 3 tokens)
    assert sched.schedule_next_decode(out) is None
    sched.update(out, model(out))
    out = sched.schedule()  # decode: this step's token is a's last (2 of 2)
    assert sched.schedule_next_decode(out) is None  # a ends by length with this step's token
    sched.update(out, model(out))
    out = sched.schedule()
    assert [r.request_id for r in out.requests] == ["b"]
    sched.add_request(Request("c", _prompt(4, 2), max_tokens=5))
    assert sched.schedule_next_decode(out) is None  # c waits for admission
    sched.update(out, model(out))
    out = sched.schedule()  # b decodes, c prefills
    assert sched.schedule_next_decode(out) is None
    sched.update(out, model(out))
    out = sched.schedule()  # both decode
    nxt = sched.schedule_next_decode(out)
    assert nxt is not None and nxt.num_scheduled == [1, 1]
    # the slot of each row's next position is allocated: exactly the blocks it needs
    for s, table in zip(nxt.starts, nxt.block_ids, strict=True):
        assert len(table) == s // BS + 1 and table.capacity >= s + 1
    sched.abort("c")
    assert sched.schedule_next_decode(out) is None  # c left the running state


def test_schedule_lookahead_is_validated():
    import pytest

    from layerzero_serve.errors import ValidationError

    sched, _, _ = _make(num_lookahead_tokens=4)
    for bad in (-1, 5, 1.5, "2"):
        with pytest.raises(ValidationError, match="lookahead"):
            sched.schedule(bad)
    sched.schedule(0)
