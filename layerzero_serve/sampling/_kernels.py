"""Sampling kernels through the selection engine: the chosen ``Op.SAMPLING`` kernel, plus a
position-invariant one for batches with a seeded row (the chosen one itself when it is).

Plug-in kernels are checked where they enter: :func:`check_kernel` (the interface, when a kernel
is built or forced) and :func:`check_tokens` (what ``sample`` returned, host metadata only). A
factory that raises or builds something that is not a sampling kernel is treated like a kernel
that fails at run time: its backend is marked unhealthy and the next candidate is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from layerzero_serve.errors import KernelOutputError, ValidationError
from layerzero_serve.kernels.sampling_api import SamplingKernel, TorchSamplingKernel
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.sampling._processors import BAD_KERNEL_OUTPUT, FAILURE_DETAILS
from layerzero_serve.selection import KernelChoice, Selector

logger = logging.getLogger("layerzero_serve")
REFERENCE_BACKEND = "torch"
MAX_FALLBACKS = 16  # kernel failures one draw may fall back from (each one a new backend)
BAD_KERNEL_DETAIL = FAILURE_DETAILS[BAD_KERNEL_OUTPUT]
KERNEL_CONTRACT = (
    "None or a sampling kernel (kernels.sampling_api.SamplingKernel): an object with a str "
    "`name`, a bool `position_invariant` and a callable "
    "`sample(probs, top_k, top_p, min_p, seed, offset)`"
)


def check_kernel(kernel: object, param: str = "kernel") -> SamplingKernel:
    """``kernel`` if it has the sampling-kernel interface, else ``ValidationError(param)``.
    Host only."""
    ok = (
        not isinstance(kernel, type)  # the class, not an instance of it
        and isinstance(getattr(kernel, "name", None), str)
        and isinstance(getattr(kernel, "position_invariant", None), bool)
        and callable(getattr(kernel, "sample", None))
    )
    if not ok:
        raise ValidationError(param, kernel, KERNEL_CONTRACT)
    return kernel  # type: ignore[return-value]


def check_tokens(kernel: SamplingKernel, tokens: object, rows: int, device) -> torch.Tensor:
    """The kernel's ``tokens`` as int64 ``[rows]``; ``KernelOutputError`` when they are not an
    integer tensor of that shape on ``device``. Host metadata only: graph-safe (the values are
    checked on the device by the sampler)."""
    if (
        not isinstance(tokens, torch.Tensor)
        or tokens.shape != (rows,)
        or tokens.device != device
        or tokens.dtype == torch.bool
        or tokens.dtype.is_floating_point
        or tokens.dtype.is_complex
    ):
        got = (
            f"{tokens.dtype} {tuple(tokens.shape)} on {tokens.device}"
            if isinstance(tokens, torch.Tensor)
            else type(tokens).__name__
        )
        raise KernelOutputError(
            f"sampling kernel {kernel.name} returned {got}; expected int64 ({rows},) on {device}"
        )
    return tokens if tokens.dtype == torch.int64 else tokens.long()


@dataclass(slots=True)
class SamplingSelection:
    """The kernels a sampler draws with, and the backend each one is blamed on."""

    kernel: SamplingKernel
    invariant: SamplingKernel
    locked: bool
    backend: str
    invariant_backend: str


def _build(spec: KernelSpec, ctx: KernelContext) -> tuple[SamplingKernel, str]:
    """``(kernel, backend)``: the spec's factory result, checked; the torch kernel when the
    factory gives None."""
    kernel = spec.factory(ctx) if spec.factory is not None else None
    if kernel is None:
        return TorchSamplingKernel(), REFERENCE_BACKEND
    return check_kernel(kernel, f"{spec.name}: factory result"), spec.backend


def select_sampling(selector: Selector, ctx: KernelContext) -> SamplingSelection:
    """The sampling kernels for the plan ``ctx`` (see the module docstring). Called at bind
    and after a fallback; host only."""

    def make(choice: KernelChoice):
        return choice, _build(choice.spec, ctx)

    choice, (kernel, backend) = selector.run_with_fallback(Op.SAMPLING, ctx, make)
    invariant, inv_backend = (kernel, backend) if kernel.position_invariant else (None, "")
    if invariant is None:
        specs = {s.name: s for s in selector.kernels(Op.SAMPLING)}
        runnable = [c for c in choice.candidates if c.score is not None and not c.chosen]
        for cand in sorted(runnable, key=lambda c: (-c.score, c.name)):
            spec = specs.get(cand.name)
            if spec is None:
                continue
            try:
                built, built_backend = _build(spec, ctx)
            except Exception as e:  # an automatic candidate: its backend is unhealthy
                if spec.backend != backend:
                    selector.mark_unhealthy(spec.backend, e)
                continue
            if built.position_invariant:
                invariant, inv_backend = built, built_backend
                break
    if invariant is None:
        invariant, inv_backend = TorchSamplingKernel(), REFERENCE_BACKEND
    logger.info("sampling kernel: %s (seeded batches: %s)", kernel.name, invariant.name)
    return SamplingSelection(kernel, invariant, choice.locked, backend, inv_backend)


def select_sampling_kernels(
    selector: Selector, ctx: KernelContext
) -> tuple[SamplingKernel, SamplingKernel, bool]:
    """(chosen kernel, position-invariant kernel, locked). Called once per plan, at start-up.

    When the chosen kernel is not position-invariant (FlashInfer's Philox stream depends on the
    row index), the best-scoring runnable candidate that is becomes the invariant one; the
    torch kernel when none is."""
    sel = select_sampling(selector, ctx)
    return sel.kernel, sel.invariant, sel.locked


def sampling_alternatives(
    selector: Selector, ctx: KernelContext
) -> list[tuple[SamplingKernel, str]]:
    """``(kernel, backend)`` for every runnable ``Op.SAMPLING`` candidate of the plan ``ctx``
    (the policy's order), built and checked; a factory that raises or builds junk is skipped
    (logged), so this never fails. Host only; for the measured per-plan choice."""
    specs = {s.name: s for s in selector.kernels(Op.SAMPLING)}
    choice = selector.select(Op.SAMPLING, ctx)
    runnable = [c for c in choice.candidates if c.score is not None]
    out = []
    for cand in sorted(runnable, key=lambda c: (not c.chosen, -c.score, c.name)):
        spec = specs.get(cand.name)
        if spec is None:
            continue
        try:
            out.append(_build(spec, ctx))
        except Exception as e:  # noqa: BLE001 - a candidate that cannot be built is left out
            logger.debug("sampling kernel %s not built: %r", spec.name, e)
    return out
