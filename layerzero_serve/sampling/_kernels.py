"""Sampling kernels through the selection engine: the chosen ``Op.SAMPLING`` kernel, plus a
position-invariant one for batches with a seeded row (the chosen one itself when it is)."""

from __future__ import annotations

import logging

from layerzero_serve.kernels.sampling_api import SamplingKernel, TorchSamplingKernel
from layerzero_serve.kernels.spec import KernelContext, Op
from layerzero_serve.selection._selector import Selector

logger = logging.getLogger("layerzero_serve")


def _build(spec, ctx: KernelContext) -> SamplingKernel:
    kernel = spec.factory(ctx) if spec.factory is not None else None
    return kernel if kernel is not None else TorchSamplingKernel()


def select_sampling_kernels(
    selector: Selector, ctx: KernelContext
) -> tuple[SamplingKernel, SamplingKernel, bool]:
    """(chosen kernel, position-invariant kernel, locked). Called once per plan, at start-up.

    When the chosen kernel is not position-invariant (FlashInfer's Philox stream depends on the
    row index), the best-scoring runnable candidate that is becomes the invariant one; the
    torch kernel when none is."""
    choice, kernel = selector.build(Op.SAMPLING, ctx)
    kernel = kernel if kernel is not None else TorchSamplingKernel()
    invariant: SamplingKernel | None = kernel if kernel.position_invariant else None
    if invariant is None:
        specs = {s.name: s for s in selector.kernels(Op.SAMPLING)}
        runnable = [c for c in choice.candidates if c.score is not None and not c.chosen]
        for cand in sorted(runnable, key=lambda c: (-c.score, c.name)):
            built = _build(specs[cand.name], ctx)
            if built.position_invariant:
                invariant = built
                break
    invariant = invariant or TorchSamplingKernel()
    logger.info("sampling kernel: %s (seeded batches: %s)", kernel.name, invariant.name)
    return kernel, invariant, choice.locked
