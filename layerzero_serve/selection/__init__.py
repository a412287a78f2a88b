"""Kernel selection engine: device probe, registry, policy, select/explain, plan cache.

``select(op, ctx)`` picks one kernel per plan and explains why every other candidate lost;
``configure``/``prefer`` set policy in code (over ``LZ_KERNEL_POLICY`` over
``LZ_KERNEL_POLICY_FILE``); ``register_kernel`` adds a user's kernel. These functions act on the
process-wide selector (:func:`get_selector`), which owns the registry, backend health, the
decision cache, the policy (a :class:`PolicyState`) and the timing table; the only module state
of this package is the reference to that selector.

Measured timings: :func:`tune_device` (``layerzero-serve tune``) times every runnable kernel of
a model's plans and writes the device's :class:`TimingTable` (JSON, keyed by a
:class:`Fingerprint` of device, driver, CUDA, torch and backend versions);
:func:`apply_device_timings` (called by the engine at start-up) loads it. Where two or more
eligible kernels of a plan are measured, the fastest wins over priority and boosts; a lock
still wins (see ``_selector``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op, Reason, Rejection
from layerzero_serve.selection._device import (
    FAKE_DEVICES,
    DeviceInfo,
    available_memory,
    backends_on,
    cpu_name,
    fake_device,
    host_memory,
    probe_device,
)
from layerzero_serve.selection._policy import Policy, PolicyError, PolicyState, load_policy_file
from layerzero_serve.selection._progress import TuneProgress
from layerzero_serve.selection._report import SelectionReport, explain, selector_for
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
from layerzero_serve.selection._timings import (
    Fingerprint,
    Measurement,
    TimingTable,
    apply_device_timings,
    device_fingerprint,
    read_table,
    table_path,
)
from layerzero_serve.selection._tuning import (
    MEASURED_OPS,
    PlanResult,
    TuneReport,
    TuneSettings,
    check_table_path,
    startup_timings,
    tune_device,
    tune_plans,
)
from layerzero_serve.selection.plans import ModelShape, batch_buckets, model_plans, select_plans


def select(op: Op, ctx: KernelContext) -> KernelChoice:
    """The process-wide selector's choice for ``op`` in ``ctx`` (cached).

    CUDA graphs: host only; called when a plan is built, never per step.
    """
    return get_selector().select(op, ctx)


def configure(
    lock: Mapping[str | Op, str] | None = None,
    allow: Iterable[str] | None = (),
    deny: Iterable[str] | None = (),
    boost: Mapping[str, float] | None = None,
    reset: bool = False,
) -> Policy:
    """Set the process-wide code policy (merged over any earlier ``configure`` unless
    ``reset``). Returns the new code policy. ``allow``/``deny`` None means empty; boosts are
    finite numbers with ``|boost| <= 1e6``.

    CUDA graphs: host only; a policy applies to plans selected afterwards, not to graphs already
    captured.
    """
    return get_selector().policy.configure(lock, allow, deny, boost, reset)


@contextlib.contextmanager
def prefer(
    lock: Mapping[str | Op, str] | None = None,
    allow: Iterable[str] | None = (),
    deny: Iterable[str] | None = (),
    boost: Mapping[str, float] | None = None,
) -> Iterator[Policy]:
    """Temporarily layer a policy over the process-wide code policy (innermost wins).

    CUDA graphs: host only; plans selected inside the block (a capture's, for example) keep its
    choice.
    """
    with get_selector().policy.prefer(lock, allow, deny, boost) as p:
        yield p


def reload_policy() -> None:
    """Re-read LZ_KERNEL_POLICY and LZ_KERNEL_POLICY_FILE (they are read once, at first use)."""
    get_selector().policy.reload()


def effective_policy() -> Policy:
    """The process-wide policy: prefer() layers > configure() > LZ_KERNEL_POLICY >
    LZ_KERNEL_POLICY_FILE."""
    return get_selector().policy.effective()


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
    "BackendState",
    "Candidate",
    "DeviceInfo",
    "FAKE_DEVICES",
    "Fingerprint",
    "KernelChoice",
    "KernelContext",
    "KernelSpec",
    "MEASURED_OPS",
    "Measurement",
    "ModelShape",
    "Op",
    "Policy",
    "PolicyError",
    "PlanResult",
    "PolicyState",
    "Reason",
    "Rejection",
    "SelectionError",
    "SelectionReport",
    "Selector",
    "TimingTable",
    "TuneProgress",
    "TuneReport",
    "TuneSettings",
    "apply_device_timings",
    "available_memory",
    "backends_on",
    "batch_buckets",
    "check_table_path",
    "configure",
    "context_key",
    "cpu_name",
    "device_fingerprint",
    "effective_policy",
    "explain",
    "fake_device",
    "get_selector",
    "host_memory",
    "load_policy_file",
    "model_plans",
    "prefer",
    "probe_device",
    "read_table",
    "register_backend",
    "register_kernel",
    "reload_policy",
    "select",
    "select_plans",
    "selector_for",
    "set_selector",
    "startup_timings",
    "table_path",
    "tune_device",
    "tune_plans",
]
