"""Host bookkeeping of one request for the sampler: admission (seed, static values) and the
table updates that (re)build or top up its slot."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.request import stop_set_of
from layerzero_serve.sampling import _state as st
from layerzero_serve.sampling._params import SamplingParams
from layerzero_serve.sampling._slot_ops import SlotOps
from layerzero_serve.sampling._validate import INT64_MAX, INT64_MIN

_DEFAULT = SamplingParams()


@dataclass(slots=True)
class CallRow:
    """A request-like row for :meth:`Sampler.__call__` (the engine passes ``types.Request``)."""

    request_id: object
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    all_token_ids: list[int]
    seed: int | None = None
    eos_token_id: int | None = None
    stop_set: frozenset[int] | None = None  # None: from the params and eos_token_id


def call_rows(logits, params, seeds, prompts, outputs, eos_token_id) -> list[CallRow]:
    """Validated one-call rows for ``Sampler.__call__``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValidationError("logits", shape, "a floating-point 2-D tensor [B, V]")
    num_rows, vocab = logits.shape
    if vocab < 1:
        raise ValidationError("logits", tuple(logits.shape), "V >= 1")
    if isinstance(params, SamplingParams):
        params = [params] * num_rows
    params = list(params)
    for name, seq in (("params", params), ("seeds", seeds), ("prompt_token_ids", prompts),
                      ("output_token_ids", outputs)):  # fmt: skip
        if seq is not None and len(seq) != num_rows:
            raise ValidationError(name, len(seq), f"exactly {num_rows} (one per row)")
    rows = []
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValidationError(f"params[{i}]", p, "a SamplingParams")
        prompt = list(prompts[i]) if prompts is not None else []
        out = list(outputs[i]) if outputs is not None else []
        seed = seeds[i] if seeds is not None else None
        if seed is not None:
            ok = isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
            if not ok or not INT64_MIN <= seed <= INT64_MAX:
                raise ValidationError(f"seeds[{i}]", seed, "None or an int in the int64 range")
            seed = int(seed)
        rows.append(CallRow(("call", i), p, prompt, prompt + out, seed, eos_token_id))
    return rows


def stop_ids(req) -> tuple[int, ...]:
    """The ids min-tokens suppresses: the request's stop set (``types.Request`` derives it once;
    a one-call row from ``stop_set_of`` of its params and EOS id)."""
    stops = req.stop_set
    if stops is None:  # a CallRow: the same definition over its params
        p = req.sampling_params
        eos = () if req.eos_token_id is None else (req.eos_token_id,)
        stops = stop_set_of(p.stop_token_ids, eos, p.ignore_eos)
    return tuple(sorted(stops))


def admit_row(req, host: st.HostTable, vocab: int, rng: np.random.Generator) -> st.RowState:
    """First sight of a request: its seed (the request's, the params', or a fresh one from the
    sampler's generator), its static values in the host table."""
    params = req.sampling_params or _DEFAULT
    seed = getattr(req, "seed", None)
    if seed is None:
        seed = params.seed
    seeded = seed is not None
    if seed is None:
        seed = int(rng.integers(INT64_MIN, INT64_MAX, dtype=np.int64, endpoint=True))
    f32, i64, flags = st.static_values(params, seed, vocab, len(req.prompt_token_ids), seeded)
    hidx = host.add(f32, i64)
    stops = stop_ids(req) if flags & st.MIN_TOKENS else ()
    return st.RowState(hidx, params, flags, stops)


def assign_slot(s: st.RowState, req, ops: SlotOps, tables: st.DeviceTables, num_out: int) -> None:
    """Rebuild slot ``s.slot`` from the request: reset, token mask, prompt and output tokens,
    stop ids."""
    tables.ensure(s.flags)
    p, slot = s.params, s.slot
    ops.reset(slot, p.allowed_token_ids is not None)
    if s.flags & st.TOKEN_MASK:
        if p.allowed_token_ids is not None:
            ops.add("allowed", slot, p.allowed_token_ids)
        if p.logit_bias:
            ops.add("bias", slot, [t for t, _ in p.logit_bias], [b for _, b in p.logit_bias])
        ops.add("bad", slot, p.bad_token_ids)
    if s.flags & st.PENALTIES:
        ops.add("prompt", slot, req.prompt_token_ids)
        ops.add("counts", slot, req.all_token_ids[len(req.prompt_token_ids) :])
    if s.flags & st.MIN_TOKENS:
        ops.add("stop", slot, s.stop_ids)
    s.counted = num_out


def top_up_counts(s: st.RowState, req, ops: SlotOps, num_out: int) -> None:
    """Add the output tokens appended since the last step to the slot's counts."""
    start = len(req.prompt_token_ids) + s.counted
    ops.add("counts", s.slot, req.all_token_ids[start:])
    s.counted = num_out
