"""Blaming an attention or KV-write kernel for NaN / inf hidden states (the failure path of an
eager step only): the step's rows are re-run with the torch reference kernels swapped in, one
suspect at a time; the suspect whose swap gives finite states is marked unhealthy. Host syncs,
on this path only."""

from __future__ import annotations

import numpy as np
import torch

from layerzero_serve.kernels.spec import Op
from layerzero_serve.runner.attention import AttentionDispatch, PhaseKernel, WriterKernel
from layerzero_serve.selection import KernelChoice

REFERENCE_BACKEND = "torch"


def reference_dispatch(runner) -> AttentionDispatch:
    """The torch reference kernels of ``runner``'s eager plans."""
    kernels = {}
    for op, ctx in runner.plans.items():
        if op in (Op.ATTN_DECODE, Op.ATTN_PREFILL, Op.KV_WRITE):
            ok = [
                s
                for s in runner.selector.kernels(op)
                if s.backend == REFERENCE_BACKEND and s.supports(ctx) is None
            ]
            spec = max(ok, key=lambda s: (s.priority, s.name))
            choice = KernelChoice(op, ctx, spec, float(spec.priority), False, ())
            kernels[op] = (choice, spec.factory(ctx))
    return AttentionDispatch(
        runner.kv_cache,
        PhaseKernel(*kernels[Op.ATTN_DECODE]),
        PhaseKernel(*kernels[Op.ATTN_PREFILL]),
        WriterKernel(*kernels[Op.KV_WRITE]),
    )


def blame_non_finite(runner, batch, hidden: torch.Tensor, rows) -> bool:
    """Rows ``rows`` of an eager step failed. When their hidden states are not finite and the
    step's automatic, non-reference attention or KV-write kernel is the cause (the torch
    kernels give finite states in its place), mark its backend unhealthy and return True (the
    caller re-selects and runs the step again)."""
    a = runner.attn
    kinds = [k for k in (a.active, a.writer) if k is not None]
    suspects = [
        k for k in kinds if not k.choice.locked and k.choice.spec.backend != REFERENCE_BACKEND
    ]
    qsl = batch.meta.query_start_loc_cpu
    idx = np.concatenate([np.arange(qsl[i], qsl[i + 1]) for i in rows])
    idx = torch.from_numpy(idx).to(hidden.device)
    if not suspects or bool(torch.isfinite(hidden[idx]).all()):
        return False  # not a kernel's NaN (degenerate logits of the request itself)
    ref = reference_dispatch(runner)
    trials = [[k] for k in suspects] + ([suspects] if len(suspects) > 1 else [])
    for swap in trials:
        phase = ref if any(k is a.active for k in swap) else a
        writer = ref.writer if any(k is a.writer for k in swap) else a.writer
        d = AttentionDispatch(runner.kv_cache, phase.decode, phase.prefill, writer)
        d.begin_step(batch.meta)
        h = runner.model(batch.input_ids, batch.positions, d, batch.meta)
        if bool(torch.isfinite(h[idx]).all()):
            for k in swap:
                err = f"{k.choice.name} returned non-finite values (the torch kernel did not)"
                runner.selector.mark_unhealthy(k.choice.spec.backend, err)
            return True
    return False
