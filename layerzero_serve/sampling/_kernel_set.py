"""The sampler's kernels, one owner: the default kernel of a plan, the position-invariant one
for plans with a seeded row, the alternatives the sampler graphs may time per (bucket, plan),
and what happens when one of them raises or returns junk.

A kernel that fails is blamed on the backend of its ``KernelSpec``: unless the kernel is forced
(locked) or is the torch reference, that backend is marked unhealthy in the selector, the
kernels are selected again, and ``epoch`` is bumped so that graphs captured with the old
kernels are dropped by their owner.
"""

from __future__ import annotations

import logging

from layerzero_serve.kernels.sampling_api import SamplingKernel, TorchSamplingKernel
from layerzero_serve.kernels.spec import KernelContext
from layerzero_serve.sampling._batch import SamplingPlan
from layerzero_serve.sampling._kernels import (
    MAX_FALLBACKS,
    REFERENCE_BACKEND,
    SamplingSelection,
    sampling_alternatives,
    select_sampling,
)
from layerzero_serve.selection import Selector

logger = logging.getLogger("layerzero_serve")


class SamplingKernels:
    """Which kernel draws which plan. Host only.

    Args:
        forced: a kernel the user forced (locked: its failures propagate), or None for the
            torch kernel until :meth:`select` picks through the selection engine.
    """

    def __init__(self, forced: SamplingKernel | None) -> None:
        self.forced = forced
        self.kernel: SamplingKernel = forced or TorchSamplingKernel()
        invariant = forced is not None and forced.position_invariant
        self.invariant: SamplingKernel = forced if invariant else TorchSamplingKernel()
        self.locked = forced is not None
        self.epoch = 0  # bumped when a failing kernel is replaced (captured graphs: stale)
        self._backends = (REFERENCE_BACKEND, REFERENCE_BACKEND)  # (kernel's, invariant's)
        self._alternatives: list[tuple[SamplingKernel, str]] | None = None
        self._selector: Selector | None = None
        self._ctx: KernelContext | None = None

    def select(self, selector: Selector, ctx: KernelContext) -> None:
        """Pick the kernels for the plan ``ctx`` (nothing to do for a forced kernel)."""
        if self.forced is None:
            self._selector, self._ctx = selector, ctx
            self._use(select_sampling(selector, ctx))

    def _use(self, sel: SamplingSelection) -> None:
        self.kernel, self.invariant, self.locked = sel.kernel, sel.invariant, sel.locked
        self._backends = (sel.backend, sel.invariant_backend)

    def for_plan(self, plan: SamplingPlan) -> SamplingKernel:
        """The kernel this plan draws with: a position-invariant one when a row is seeded."""
        return self.invariant if plan.invariant else self.kernel

    def candidates(self, plan: SamplingPlan) -> list[SamplingKernel]:
        """The kernels that may draw ``plan``: the default first, then every other healthy
        runnable ``Op.SAMPLING`` kernel of the selection engine (built once). Only the default
        for a forced kernel, and for a seeded plan: a seed must give the same tokens on every
        run, which a choice by measured time (noisy) could not promise."""
        default = self.for_plan(plan)
        if self.locked or self._selector is None or plan.invariant:
            return [default]
        sick = self._selector.unhealthy()
        out = [default]
        for k, backend in self._built_alternatives():
            if backend not in sick and k.name not in {o.name for o in out}:
                out.append(k)
        return out

    def _built_alternatives(self) -> list[tuple[SamplingKernel, str]]:
        if self._alternatives is None:
            self._alternatives = sampling_alternatives(self._selector, self._ctx)
        return self._alternatives

    def backend_of(self, kernel: SamplingKernel) -> str:
        """The backend a failure of ``kernel`` is blamed on."""
        if kernel is self.kernel:
            return self._backends[0]
        if kernel is self.invariant:
            return self._backends[1]
        if self.locked or self._selector is None:
            return REFERENCE_BACKEND
        found = [b for k, b in self._built_alternatives() if k is kernel]
        return found[0] if found else REFERENCE_BACKEND

    def with_fallback(self, plan: SamplingPlan, call, first: SamplingKernel | None = None):
        """``(call(kernel), kernel)`` with ``first`` (or the plan's kernel); when it raises,
        :meth:`fall_back` (which re-raises when final) and again with the plan's (new) kernel,
        a bounded number of times."""
        for _ in range(MAX_FALLBACKS):
            kernel = first or self.for_plan(plan)
            try:
                return call(kernel), kernel
            except Exception as e:
                first = None
                self.fall_back(kernel, e)
        kernel = self.for_plan(plan)
        return call(kernel), kernel  # the last try: its error propagates

    def fall_back(self, kernel: SamplingKernel, error: Exception) -> None:
        """``kernel`` raised or returned junk: re-raise ``error`` when that is final (a locked
        kernel or the torch reference); else mark the backend of its ``KernelSpec`` unhealthy
        (unless it already is) and choose again, so the next call draws with another kernel."""
        backend = self.backend_of(kernel)
        if self.locked or backend == REFERENCE_BACKEND or self._selector is None:
            raise error
        logger.warning("sampling kernel %s failed (%s); choosing another", kernel.name, error)
        self.epoch += 1
        if backend not in self._selector.unhealthy():
            self._selector.mark_unhealthy(backend, error)
        self._alternatives = None  # rebuilt without the unhealthy backend
        self._use(select_sampling(self._selector, self._ctx))
