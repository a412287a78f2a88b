"""Hand-written behaviour cases of the continuous-batching scheduler (pure CPU)."""

from __future__ import annotations

import pytest
from fake_model import FakeModel, reference_output

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache import KVCacheManager
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.types import Request, RequestOutput, RequestStatus

BS = 4


def _prompt(n: int, seed: int = 0) -> list[int]:
    return [(seed * 31 + i * 7 + 3) % 97 for i in range(n)]


def _make(num_blocks: int = 64, block_size: int = BS, prefix_caching: bool = True, **cfg):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(**cfg), kv), kv, FakeModel(num_blocks, block_size)


def _spans(out) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


def _step(sched: Scheduler, model: FakeModel):
    out = sched.schedule()
    outs = sched.update(out, model(out) if out.chunks else [])
    sched.kv.check_integrity()
    return out, outs


def _drain(sched: Scheduler, model: FakeModel, streamed=None, max_steps: int = 2000):
    """Step until nothing is left; returns the per-step spans."""
    history = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return history
        out, outs = _step(sched, model)
        history.append(_spans(out))
        if streamed is not None:
            for o in outs:
                streamed.setdefault(o.request_id, []).append(o)
    raise AssertionError("scheduler did not finish")


# ---- chunked prefill ------------------------------------------------------------------------
def test_long_prompt_split_by_token_budget():
    sched, kv, model = _make(max_num_batched_tokens=8)
    req = Request("A", _prompt(20), max_tokens=2)
    sched.add_request(req)
    outs_per_step = []
    samples = []
    batched = []
    spans = []
    while sched.has_unfinished():
        out = sched.schedule()
        spans.append(_spans(out))
        samples.append([c.samples for c in out.chunks])
        batched.append(out.num_batched_tokens)
        outs_per_step.append(list(sched.update(out, model(out))))
        kv.check_integrity()
    assert spans == [[("A", 0, 8)], [("A", 8, 8)], [("A", 16, 4)], [("A", 20, 1)]]
    assert samples == [[False], [False], [True], [True]]
    assert batched == [8, 8, 4, 1]
    # A prefill chunk short of the prompt's end produces no output at all.
    assert outs_per_step[0] == [] and outs_per_step[1] == []
    assert req.output_token_ids == reference_output(model, req.prompt_token_ids, 2)


def test_prefill_chunk_cap_limits_each_chunk():
    sched, kv, model = _make(max_num_batched_tokens=16, max_prefill_chunk=6)
    sched.add_request(Request("A", _prompt(20), max_tokens=1))
    history = _drain(sched, model)
    assert history == [[("A", 0, 6)], [("A", 6, 6)], [("A", 12, 6)], [("A", 18, 2)]]


def test_two_prefills_interleave_under_cap_and_budget():
    # Budget 10, cap 6: A takes 6 per step, B gets the remaining 4.
    sched, kv, model = _make(max_num_batched_tokens=10, max_prefill_chunk=6)
    a = Request("A", _prompt(20, 1), max_tokens=2)
    b = Request("B", _prompt(9, 2), max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    history = _drain(sched, model)
    assert history[:3] == [
        [("A", 0, 6), ("B", 0, 4)],
        [("A", 6, 6), ("B", 4, 4)],
        [("B", 8, 1), ("A", 12, 6)],  # B's last token is decode-like: it goes first
    ]
    assert a.output_token_ids == reference_output(model, a.prompt_token_ids, 2)
    assert b.output_token_ids == reference_output(model, b.prompt_token_ids, 2)


def test_decode_and_prefill_share_the_token_budget():
    sched, kv, model = _make(max_num_batched_tokens=8)
    a = Request("A", _prompt(3, 1), max_tokens=10)
    sched.add_request(a)
    out, _ = _step(sched, model)
    assert _spans(out) == [("A", 0, 3)]
    b = Request("B", _prompt(30, 2), max_tokens=2)
    sched.add_request(b)
    history = []
    batched = []
    for _ in range(5):
        out, _ = _step(sched, model)
        history.append(_spans(out))
        batched.append(out.num_batched_tokens)
    assert history == [
        [("A", 3, 1), ("B", 0, 7)],
        [("A", 4, 1), ("B", 7, 7)],
        [("A", 5, 1), ("B", 14, 7)],
        [("A", 6, 1), ("B", 21, 7)],
        [("A", 7, 1), ("B", 28, 2)],
    ]
    assert batched == [8, 8, 8, 8, 3]
    _drain(sched, model)
    assert a.output_token_ids == reference_output(model, a.prompt_token_ids, 10)
    assert b.output_token_ids == reference_output(model, b.prompt_token_ids, 2)


def test_running_decode_is_not_starved_by_a_prefill_ahead_of_it():
    """scheduler.py: every running request asks for its tokens, "decode-like requests first,
    under a token budget". A decode needs 1 token of a 16-token budget, so it must be scheduled
    in every step, next to the prefill chunks (the budget is shared, not taken whole by a
    prefill that sorts ahead of the decode in the running queue)."""
    sched, kv, model = _make(max_num_batched_tokens=16, policy="priority")
    b = Request("B", _prompt(3, 1), max_tokens=20, priority=5)  # low priority, decoding
    a = Request("A", _prompt(60, 2), max_tokens=3, priority=0)  # high priority, long prompt
    sched.add_request(b)
    _step(sched, model)
    sched.add_request(a)
    history = []
    while a.num_computed_tokens < a.num_prompt_tokens:
        out, _ = _step(sched, model)
        history.append(sorted(_spans(out)))  # row order aside
    assert history == [
        [("A", 0, 15), ("B", 3, 1)],
        [("A", 15, 15), ("B", 4, 1)],
        [("A", 30, 15), ("B", 5, 1)],
        [("A", 45, 15), ("B", 6, 1)],
    ]
    _drain(sched, model)
    assert a.output_token_ids == reference_output(model, a.prompt_token_ids, 3)
    assert b.output_token_ids == reference_output(model, b.prompt_token_ids, 20)


def test_max_num_seqs_bounds_each_step():
    sched, kv, model = _make(max_num_seqs=2)
    reqs = [Request(rid, _prompt(4, i), max_tokens=3) for i, rid in enumerate("ABCDE")]
    for r in reqs:
        sched.add_request(r)
    history = _drain(sched, model)
    assert history == [
        [("A", 0, 4), ("B", 0, 4)],
        [("A", 4, 1), ("B", 4, 1)],
        [("A", 5, 1), ("B", 5, 1)],
        [("C", 0, 4), ("D", 0, 4)],
        [("C", 4, 1), ("D", 4, 1)],
        [("C", 5, 1), ("D", 5, 1)],
        [("E", 0, 4)],
        [("E", 4, 1)],
        [("E", 5, 1)],
    ]
    for r in reqs:
        assert r.output_token_ids == reference_output(model, r.prompt_token_ids, 3)


def test_without_chunked_prefill_prompts_are_admitted_whole():
    sched, kv, model = _make(
        max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False
    )
    a = Request("A", _prompt(20, 1), max_tokens=4)
    b = Request("B", _prompt(20, 2), max_tokens=4)
    c = Request("C", _prompt(31, 3), max_tokens=1)
    for r in (a, b, c):
        sched.add_request(r)
    history = _drain(sched, model)
    assert history == [
        [("A", 0, 20)],  # B (20 tokens) does not fit the 12 left: not split, it waits
        [("A", 20, 1), ("B", 0, 20)],  # C (31) does not fit the 11 left
        [("A", 21, 1), ("B", 20, 1)],  # nor the 30 left
        [("A", 22, 1), ("B", 21, 1)],  # A finishes (4 tokens)
        [("B", 22, 1), ("C", 0, 31)],  # 31 left: C fits whole
    ]
    for r in (a, b, c):
        assert r.output_token_ids == reference_output(model, r.prompt_token_ids, r.max_tokens)


def test_b_admitted_whole_next_to_a_decode():
    sched, kv, model = _make(
        max_num_batched_tokens=32, max_model_len=32, enable_chunked_prefill=False
    )
    a = Request("A", _prompt(10, 1), max_tokens=5)
    sched.add_request(a)
    _step(sched, model)
    b = Request("B", _prompt(31, 2), max_tokens=2)
    sched.add_request(b)
    out, _ = _step(sched, model)
    # 1 decode token + 31 prompt tokens == the whole budget.
    assert _spans(out) == [("A", 10, 1), ("B", 0, 31)]
    assert out.num_batched_tokens == 32


def test_without_chunked_prefill_max_prefill_chunk_does_not_split_prompts():
    """enable_chunked_prefill=False means "a prompt is admitted only whole". A config that also
    sets max_prefill_chunk must either be rejected up front or keep prompts whole."""
    try:
        cfg = SchedulerConfig(
            max_num_batched_tokens=64,
            max_model_len=64,
            enable_chunked_prefill=False,
            max_prefill_chunk=4,
        )
    except ValidationError as e:
        assert e.param in ("max_prefill_chunk", "enable_chunked_prefill")
        return
    kv = KVCacheManager(64, BS)
    sched, model = Scheduler(cfg, kv), FakeModel(64, BS)
    sched.add_request(Request("A", _prompt(10), max_tokens=1))
    out, _ = _step(sched, model)
    assert _spans(out) == [("A", 0, 10)]


# ---- prefix caching ------------------------------------------------------------------------
def test_prefix_hit_skips_cached_full_blocks():
    sched, kv, model = _make()
    base = _prompt(10, 5)
    a = Request("A", base, max_tokens=3)
    sched.add_request(a)
    _drain(sched, model)
    assert a.num_cached_tokens == 0
    assert (kv.stats.queries, kv.stats.hits) == (10, 0)

    # Shares A's first two blocks (8 tokens), then differs.
    b = Request("B", base[:8] + [90, 91, 92, 93, 94], max_tokens=2)
    sched.add_request(b)
    history = _drain(sched, model)
    assert history[0] == [("B", 8, 5)]
    assert b.num_cached_tokens == 8
    assert (kv.stats.queries, kv.stats.hits) == (23, 8)
    assert b.output_token_ids == reference_output(model, b.prompt_token_ids, 2)

    # A's blocks include its generated tokens: A computed 12 of its 13 tokens, 3 full blocks.
    c = Request("C", a.all_token_ids[:12] + [1, 2], max_tokens=2)
    sched.add_request(c)
    history = _drain(sched, model)
    assert history[0] == [("C", 12, 2)]
    assert c.num_cached_tokens == 12
    assert (kv.stats.queries, kv.stats.hits) == (37, 20)
    assert c.output_token_ids == reference_output(model, c.prompt_token_ids, 2)
    assert kv.num_free_blocks == kv.num_usable_blocks


@pytest.mark.parametrize(("prompt_len", "start"), [(12, 8), (8, 4), (4, 0), (5, 4), (3, 0)])
def test_prefix_hit_never_covers_the_last_prompt_token(prompt_len, start):
    sched, kv, model = _make()
    base = _prompt(12, 9)
    sched.add_request(Request("A", base, max_tokens=1))
    _drain(sched, model)
    b = Request("B", base[:prompt_len], max_tokens=2)
    sched.add_request(b)
    history = _drain(sched, model)
    assert history[0] == [("B", start, prompt_len - start)]
    assert b.num_cached_tokens == start
    assert kv.stats.hits == start
    assert b.output_token_ids == reference_output(model, b.prompt_token_ids, 2)


def test_an_identical_prompt_waits_for_the_prefill_then_forks_it():
    sched, kv, model = _make()
    base = _prompt(12, 4)
    a, b = Request("A", base, max_tokens=4), Request("B", base, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = _step(sched, model)
    # A's KV is not written yet when B would be admitted: B waits instead of recomputing it
    assert _spans(out) == [("A", 0, 12)]
    c = Request("C", base, max_tokens=2)
    sched.add_request(c)
    out, _ = _step(sched, model)
    # B and C fork A's blocks and compute only the last prompt token (their own logits there)
    assert _spans(out) == [("A", 12, 1), ("B", 11, 1), ("C", 11, 1)]
    assert kv.block_ids("B")[:2] == kv.block_ids("A")[:2]  # the full blocks, by reference
    assert sched.num_prompt_tokens_computed == 12 + 1 + 1
    _drain(sched, model)
    ref = reference_output(model, base, 4)
    assert a.output_token_ids == ref and b.output_token_ids == c.output_token_ids == ref[:2]
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_prefix_caching_disabled_computes_everything():
    sched, kv, model = _make(prefix_caching=False)
    base = _prompt(12, 3)
    sched.add_request(Request("A", base, max_tokens=1))
    _drain(sched, model)
    b = Request("B", base, max_tokens=1)
    sched.add_request(b)
    history = _drain(sched, model)
    assert history[0] == [("B", 0, 12)]
    assert b.num_cached_tokens == 0
    assert (kv.stats.queries, kv.stats.hits) == (0, 0)


# ---- rejection -----------------------------------------------------------------------------
@pytest.mark.parametrize("limit", ["max_model_len", "pool"])
def test_too_long_prompt_is_rejected_at_once(limit):
    if limit == "max_model_len":
        sched, kv, model = _make(max_model_len=16)
    else:
        sched, kv, model = _make(num_blocks=5)  # 4 usable blocks of 4 = 16 tokens
    assert sched.max_seq_len == 16
    ok = Request("ok", _prompt(15, 1), max_tokens=5)
    big = Request("big", _prompt(16, 2), max_tokens=5)
    assert sched.add_request(big) is False
    assert big.status == RequestStatus.FINISHED_REJECTED
    assert big.finish_reason == "rejected"
    assert ("max_model_len" if limit == "max_model_len" else "KV pool") in big.finish_detail
    assert big not in sched.waiting.items and big not in sched.running.items
    assert kv.block_ids("big") == []
    assert sched.has_unfinished()
    assert sched.add_request(ok) is True

    out = sched.schedule()
    assert _spans(out) == [("ok", 0, 15)]
    outs = sched.update(out, model(out))
    by_id = {o.request_id: o for o in outs}
    assert set(by_id) == {"ok", "big"}
    rej = by_id["big"]
    assert (rej.new_token_ids, rej.finished, rej.finish_reason, rej.num_output_tokens) == (
        [],
        True,
        "rejected",
        0,
    )
    assert rej.detail == big.finish_detail
    # 15 prompt tokens + 1 output reach the 16-token cap.
    okout = by_id["ok"]
    assert okout.finished and okout.finish_reason == "length"
    assert ok.output_token_ids == reference_output(model, ok.prompt_token_ids, 1)
    assert not sched.has_unfinished()
    assert list(sched.update(sched.schedule(), [])) == []  # reported once only


def test_rejection_is_reported_by_step_without_running_the_model():
    sched, kv, model = _make(max_model_len=8)
    big = Request("big", _prompt(8), max_tokens=1)
    sched.add_request(big)
    assert not sched.waiting and not sched.running
    outs = sched.step(model)
    assert model.num_calls == 0
    assert list(outs) == [RequestOutput("big", [], True, "rejected", 0, big.finish_detail)]
    assert not sched.has_unfinished()


def test_duplicate_request_id_raises_while_active_and_is_free_once_reported():
    sched, kv, model = _make(max_model_len=16, max_num_seqs=1)
    reqs = {
        "rejected": Request("rejected", _prompt(16), max_tokens=1),
        "done": Request("done", _prompt(4), max_tokens=1),
    }
    for r in reqs.values():
        sched.add_request(r)
    _step(sched, model)
    for rid in ("running", "waiting"):
        reqs[rid] = Request(rid, _prompt(4), max_tokens=5)
        sched.add_request(reqs[rid])
    _step(sched, model)
    assert reqs["running"].status == RequestStatus.RUNNING
    assert reqs["waiting"].status == RequestStatus.WAITING
    assert reqs["done"].status == RequestStatus.FINISHED_LENGTH
    for rid in ("running", "waiting"):
        with pytest.raises(ValueError) as exc:
            sched.add_request(Request(rid, _prompt(3), max_tokens=1))
        assert isinstance(exc.value, ValidationError) and exc.value.param == "request_id"
    # Finished and reported requests are dropped from the scheduler: their ids can be reused.
    assert "done" not in sched.requests and "rejected" not in sched.requests
    assert len(sched.waiting) == 1 and len(sched.running) == 1
    _drain(sched, model)
    for rid in ("running", "waiting"):
        r = reqs[rid]
        assert r.output_token_ids == reference_output(model, r.prompt_token_ids, 5)
    assert kv.num_free_blocks == kv.num_usable_blocks
    reuse = Request("done", _prompt(4, 9), max_tokens=2)
    assert sched.add_request(reuse) is True
    _drain(sched, model)
    assert reuse.output_token_ids == reference_output(model, reuse.prompt_token_ids, 2)


# ---- abort -----------------------------------------------------------------------------------
def _assert_aborted_once(sched, req, outs_after):
    rid = req.request_id
    assert req.status == RequestStatus.FINISHED_ABORTED
    assert req.finish_reason == "abort"
    assert sched.kv.block_ids(rid) == []
    assert req not in sched.waiting.items and req not in sched.running.items
    assert sched.abort(rid) is False  # twice is a no-op
    mine = [o for o in outs_after if o.request_id == rid]
    assert len(mine) == 1
    assert (mine[0].new_token_ids, mine[0].finished, mine[0].finish_reason) == ([], True, "abort")
    assert mine[0].num_output_tokens == req.num_output_tokens


def test_abort_waiting_request():
    sched, kv, model = _make(max_num_seqs=1)
    a, b = Request("A", _prompt(5, 1), max_tokens=3), Request("B", _prompt(5, 2), max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    _step(sched, model)
    assert b.status == RequestStatus.WAITING
    assert sched.abort("B") is True
    streamed: dict = {}
    _drain(sched, model, streamed)
    _assert_aborted_once(sched, b, streamed["B"])
    assert b.output_token_ids == []
    assert a.output_token_ids == reference_output(model, a.prompt_token_ids, 3)
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_abort_running_mid_prefill():
    sched, kv, model = _make(max_num_batched_tokens=4)
    a = Request("A", _prompt(20, 1), max_tokens=3)
    sched.add_request(a)
    _step(sched, model)
    assert a.status == RequestStatus.RUNNING and a.num_computed_tokens == 4
    assert len(kv.block_ids("A")) == 1
    assert sched.abort("A") is True
    assert kv.num_free_blocks == kv.num_usable_blocks
    kv.check_integrity()
    out, outs = _step(sched, model)
    assert out.chunks == []
    _assert_aborted_once(sched, a, outs)
    assert a.output_token_ids == []
    assert not sched.has_unfinished()


def test_abort_running_decode():
    sched, kv, model = _make()
    a, b = Request("A", _prompt(6, 1), max_tokens=8), Request("B", _prompt(7, 2), max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(3):
        _step(sched, model)
    assert a.num_output_tokens == 3
    assert sched.abort("A") is True
    streamed: dict = {}
    _drain(sched, model, streamed)
    _assert_aborted_once(sched, a, streamed["A"])
    assert a.output_token_ids == reference_output(model, a.prompt_token_ids, 3)
    assert b.output_token_ids == reference_output(model, b.prompt_token_ids, 8)
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_abort_preempted_request():
    # 6 usable blocks; four 4-token prompts fill four; the first decode step preempts D.
    sched, kv, model = _make(num_blocks=7)
    reqs = [Request(rid, _prompt(4, i), max_tokens=4) for i, rid in enumerate("ABCD")]
    for r in reqs:
        sched.add_request(r)
    _step(sched, model)
    out, _ = _step(sched, model)
    assert out.preempted_ids == ["D"]
    d = reqs[3]
    assert d.status == RequestStatus.PREEMPTED and d in sched.waiting.items
    assert sched.abort("D") is True
    kv.check_integrity()
    streamed: dict = {}
    _drain(sched, model, streamed)
    _assert_aborted_once(sched, d, streamed["D"])
    assert d.output_token_ids == reference_output(model, d.prompt_token_ids, 1)
    for r in reqs[:3]:
        assert r.output_token_ids == reference_output(model, r.prompt_token_ids, 4)
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_abort_finished_or_unknown_is_a_no_op():
    sched, kv, model = _make()
    a = Request("A", _prompt(5), max_tokens=1)
    sched.add_request(a)
    out = sched.schedule()
    sched.update(out, model(out))
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert sched.abort("A") is False
    assert sched.abort("nope") is False
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert not sched.has_unfinished()
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_abort_finished_but_unreported_keeps_its_reason():
    sched, kv, model = _make(max_model_len=8)
    sched.add_request(Request("big", _prompt(8), max_tokens=1))
    assert sched.abort("big") is False
    outs = sched.step(model)
    assert [(o.request_id, o.finish_reason) for o in outs] == [("big", "rejected")]


@pytest.mark.parametrize("when", ["before-model", "after-model"])
@pytest.mark.parametrize("victim_state", ["prefill", "decode"])
def test_abort_between_schedule_and_update(when, victim_state):
    sched, kv, model = _make(max_num_batched_tokens=16)
    shared = _prompt(8, 7)
    a = Request("A", shared + _prompt(9, 1), max_tokens=6)
    b = Request("B", shared + _prompt(30, 2), max_tokens=6)
    c = Request("C", shared + _prompt(5, 3), max_tokens=6)
    for r in (a, b, c):
        sched.add_request(r)
    # Step until B is in the wanted state when scheduled.
    for _ in range(50):
        out = sched.schedule()
        chunk = next((ch for ch in out.chunks if ch.request is b), None)
        in_state = chunk is not None and (
            (victim_state == "prefill" and not chunk.samples and chunk.start > 0)
            or (victim_state == "decode" and chunk.start >= b.num_prompt_tokens)
        )
        if in_state:
            break
        sched.update(out, model(out))
        kv.check_integrity()
    else:
        raise AssertionError("B never reached the wanted state")
    n_out = b.num_output_tokens
    if when == "before-model":
        assert sched.abort("B") is True
        toks = model(out)
    else:
        toks = model(out)
        assert sched.abort("B") is True
    outs = sched.update(out, toks)
    kv.check_integrity()
    mine = [o for o in outs if o.request_id == "B"]
    assert [(o.new_token_ids, o.finished, o.finish_reason) for o in mine] == [([], True, "abort")]
    assert b.num_output_tokens == n_out  # the skipped chunk's token is not appended
    streamed: dict = {}
    _drain(sched, model, streamed)
    assert "B" not in streamed
    assert b.output_token_ids == reference_output(model, b.prompt_token_ids, 6)[:n_out]
    for r in (a, c):
        assert r.output_token_ids == reference_output(model, r.prompt_token_ids, 6)
    assert kv.num_free_blocks == kv.num_usable_blocks


# ---- stop conditions -----------------------------------------------------------------------
def _run_one(req: Request, **cfg):
    sched, kv, model = _make(**cfg)
    sched.add_request(req)
    streamed: dict = {}
    _drain(sched, model, streamed)
    outs = streamed[req.request_id]
    # Streaming: concatenation of new_token_ids equals the final output; one final message.
    assert [t for o in outs for t in o.new_token_ids] == req.output_token_ids
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1].finish_reason == req.finish_reason
    assert [o.num_output_tokens for o in outs] == list(range(1, len(outs) + 1))
    assert kv.num_free_blocks == kv.num_usable_blocks
    return model


_P = _prompt(7, 11)
_REF20 = reference_output(FakeModel(2, BS), _P, 20)
# First output position whose token did not occur earlier: a stop token there ends the output
# exactly after it.
_K = next(i for i in range(3, 20) if _REF20[i] not in _REF20[:i])


def test_reference_sanity():
    assert len(_REF20) == 20 and 3 <= _K < 20


def test_stop_at_max_tokens():
    req = Request("A", _P, max_tokens=5)
    _run_one(req)
    assert req.finish_reason == "length"
    assert req.output_token_ids == _REF20[:5]


def test_stop_at_eos():
    req = Request("A", _P, max_tokens=20, eos_token_id=_REF20[_K])
    _run_one(req)
    assert req.finish_reason == "stop"
    assert req.output_token_ids == _REF20[: _K + 1]


def test_ignore_eos_runs_to_max_tokens():
    req = Request("A", _P, max_tokens=20, eos_token_id=_REF20[_K], ignore_eos=True)
    _run_one(req)
    assert req.finish_reason == "length"
    assert req.output_token_ids == _REF20


def test_stop_token_ids():
    req = Request("A", _P, max_tokens=20, stop_token_ids=frozenset({_REF20[_K], 1000}))
    _run_one(req)
    assert req.finish_reason == "stop"
    assert req.output_token_ids == _REF20[: _K + 1]


def test_stop_token_ids_apply_even_with_ignore_eos():
    req = Request("A", _P, max_tokens=20, stop_token_ids=frozenset({_REF20[_K]}), ignore_eos=True)
    _run_one(req)
    assert req.finish_reason == "stop"
    assert req.output_token_ids == _REF20[: _K + 1]


def test_eos_on_last_allowed_token_is_stop():
    req = Request("A", _P, max_tokens=_K + 1, eos_token_id=_REF20[_K])
    _run_one(req)
    assert req.finish_reason == "stop"
    assert req.output_token_ids == _REF20[: _K + 1]


def test_length_cap_at_max_model_len():
    req = Request("A", _P, max_tokens=20)
    _run_one(req, max_model_len=12)
    assert req.finish_reason == "length"
    assert req.num_tokens == 12
    assert req.output_token_ids == _REF20[:5]


def test_length_cap_at_pool_size():
    req = Request("A", _P, max_tokens=20)
    _run_one(req, num_blocks=4)  # 3 usable blocks of 4 = 12 tokens
    assert req.finish_reason == "length"
    assert req.output_token_ids == _REF20[:5]


def test_tokens_after_a_stop_in_one_update_are_dropped():
    sched, kv, _ = _make()
    req = Request("A", [1, 2, 3], max_tokens=10, eos_token_id=7)
    sched.add_request(req)
    out = sched.schedule()
    outs = sched.update(out, [[5, 7, 9]])
    assert list(outs) == [RequestOutput("A", [5, 7], True, "stop", 2)]
    assert req.output_token_ids == [5, 7]
    assert kv.block_ids("A") == []
    req2 = Request("B", [1, 2, 3], max_tokens=2)
    sched.add_request(req2)
    out = sched.schedule()
    outs = sched.update(out, [[5, 6, 8]])
    assert list(outs) == [RequestOutput("B", [5, 6], True, "length", 2)]


# ---- config validation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_seqs": -3}, "max_num_seqs"),
        ({"max_num_seqs": 1.5}, "max_num_seqs"),
        ({"max_num_seqs": True}, "max_num_seqs"),
        ({"max_num_seqs": "8"}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_num_batched_tokens": None}, "max_num_batched_tokens"),
        ({"max_model_len": 1}, "max_model_len"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"max_prefill_chunk": -1}, "max_prefill_chunk"),
        ({"num_lookahead_tokens": -1}, "num_lookahead_tokens"),
        ({"policy": "lifo"}, "policy"),
        ({"policy": "FCFS"}, "policy"),
        (
            {"enable_chunked_prefill": False, "max_num_batched_tokens": 100, "max_model_len": 101},
            "max_num_batched_tokens",
        ),
    ],
)
def test_config_validation(kwargs, param):
    with pytest.raises(ValueError) as exc:
        SchedulerConfig(**kwargs)
    assert isinstance(exc.value, ValidationError)
    assert exc.value.param == param
    assert param in str(exc.value)


def test_config_valid_edges():
    cfg = SchedulerConfig(
        max_num_seqs=1,
        max_num_batched_tokens=2,
        max_model_len=2,
        enable_chunked_prefill=False,
        max_prefill_chunk=0,
        policy="priority",
        num_lookahead_tokens=0,
    )
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len) == (1, 2, 2)
    with pytest.raises(AttributeError):
        cfg.max_num_seqs = 5  # frozen


def test_a_sample_never_forks_across_cache_salts():
    """Sharing keeps the prefix cache's isolation: a leader with another salt (its id reused
    by another tenant) is not forked; the request computes its own prompt."""
    sched, kv, model = _make()
    base = _prompt(12, 5)
    a = Request("A", base, max_tokens=3, cache_salt="tenant-b")
    b = Request("B", base, max_tokens=3, cache_salt="tenant-a", prompt_leader="A")
    sched.add_request(a)
    sched.add_request(b)
    out, _ = _step(sched, model)
    assert _spans(out) == [("A", 0, 12), ("B", 0, 12)]  # no wait, no fork, no shared block
    assert not set(kv.block_ids("A")) & set(kv.block_ids("B"))
    _drain(sched, model)
    assert b.output_token_ids == reference_output(model, base, 3)
