"""Kernel selection engine: device probe, registry, policy, select/explain, plan cache.

``select(op, ctx)`` picks one kernel per plan and explains why every other candidate lost;
``configure``/``prefer`` set policy in code (over ``LZ_KERNEL_POLICY`` over
``LZ_KERNEL_POLICY_FILE``); ``register_kernel`` adds a user's kernel.
"""

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op, Reason, Rejection
from layerzero_serve.selection._device import FAKE_DEVICES, DeviceInfo, fake_device, probe_device
from layerzero_serve.selection._policy import (
    Policy,
    PolicyError,
    configure,
    effective_policy,
    load_policy_file,
    prefer,
    reload_policy,
)
from layerzero_serve.selection._report import SelectionReport, explain
from layerzero_serve.selection._selector import (
    BackendState,
    Candidate,
    KernelChoice,
    SelectionError,
    Selector,
    context_key,
    get_selector,
    set_selector,
)
from layerzero_serve.selection.plans import ModelShape, batch_buckets, model_plans, select_plans


def select(op: Op, ctx: KernelContext) -> KernelChoice:
    """The process-wide selector's choice for ``op`` in ``ctx`` (cached).

    CUDA graphs: host only; called when a plan is built, never per step.
    """
    return get_selector().select(op, ctx)


def register_kernel(spec: KernelSpec, replace: bool = False) -> None:
    """Register a kernel with the process-wide selector. A backend the probe does not know
    (your own) must also be declared with :func:`register_backend`.

    CUDA graphs: host only; call it before the plans that should see the kernel are selected.
    """
    get_selector().register(spec, replace=replace)


def register_backend(name: str, available: bool = True, version: str | None = None) -> None:
    """Declare a backend (for example ``"user"`` for your own kernels) available to the
    process-wide selector.

    CUDA graphs: host only; call it before the plans that should see the backend are selected.
    """
    get_selector().register_backend(name, available, version)


__all__ = [
    "FAKE_DEVICES",
    "BackendState",
    "Candidate",
    "DeviceInfo",
    "KernelChoice",
    "KernelContext",
    "KernelSpec",
    "ModelShape",
    "Op",
    "Policy",
    "PolicyError",
    "Reason",
    "Rejection",
    "SelectionError",
    "SelectionReport",
    "Selector",
    "batch_buckets",
    "configure",
    "context_key",
    "effective_policy",
    "explain",
    "fake_device",
    "get_selector",
    "load_policy_file",
    "model_plans",
    "prefer",
    "probe_device",
    "register_backend",
    "register_kernel",
    "reload_policy",
    "select",
    "select_plans",
    "set_selector",
]
