"""Drive an engine through a scripted run (shared by the CPU and GPU async-scheduling tests)."""

from __future__ import annotations

from layerzero_serve.engine import Engine


def drive(eng: Engine, requests, abort_at=None, late=None) -> dict[str, tuple[list[int], str]]:
    """Add ``requests`` (``(prompt, params)`` pairs) and step until done; ``abort_at = (step,
    index)`` aborts one mid-run, ``late = (step, prompt, params)`` adds one. Returns each
    sequence's ``(tokens, finish reason)`` by request name, after checking that the KV manager
    is consistent and every block came back."""
    ids = [eng.add_request(p, sp) for p, sp in requests]
    got: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    step = 0
    while eng.has_unfinished() or (late is not None and step <= late[0]):
        if abort_at is not None and step == abort_at[0]:
            eng.abort(ids[abort_at[1]])
        if late is not None and step == late[0]:
            ids.append(eng.add_request(*late[1:]))
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        step += 1
    eng.kv_manager.check_integrity()
    assert eng.kv_manager.pool.num_free == eng.kv_manager.num_usable_blocks  # nothing leaked
    return {n: (got[n], reasons.get(n)) for n in sorted(got)}
