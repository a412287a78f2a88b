"""Measure kernels and fill the timing table (``layerzero-serve tune``, ``LZ_TUNE_AT_STARTUP``).

For each plan (a ``KernelContext`` of :func:`~layerzero_serve.selection.plans.model_plans`),
every kernel that can run it here (constraints, availability, health; the policy is ignored
because the table outlives it) is built with ``KernelSpec.factory(ctx)`` and called on synthetic
inputs: ``warmup`` calls, then ``reps`` timed calls (CUDA events on a GPU, ``perf_counter`` on
the CPU); the median and p95 go to the table under ``(kernel name, context_key(ctx))``. A
factory or call that raises is recorded as failed (it then counts as unmeasured) and tuning
goes on; nothing is marked unhealthy.

Measured ops and their synthetic inputs (one set per plan, shared by its candidates):

* ``attention_decode``: ``batch_bucket`` rows of one query token over ``context_len`` cached
  tokens each (graph-mode plans are timed as eager ``run`` calls of their graph-safe kernel);
  ``plan(meta)`` runs once, outside the timed calls (it is per step, ``run`` is per layer).
* ``sampling``: ``batch_bucket`` rows of ``softmax(randn * 3 / 0.8)`` over the vocabulary, with
  top-k 200 on every row and top-p 0.95 on every other one (a temperature + top-k mix).
* ``kv_write``: one token per row of ``batch_bucket`` rows (a decode step's write).
* ``attention_prefill``: ``min(batch_bucket, 4)`` prompts of ``prefill_len`` tokens.

Not measured: ``attention_verify``/``rejection_sampling`` (not among a serving run's plans),
``rmsnorm``/``rope``/``swiglu`` (their kernels replace the model's modules rather than being
called through one interface). Triton-based kernels (backends ``triton``, ``liger_kernel``) are
skipped on the CPU and under ``TRITON_INTERPRET=1``: the interpreter's time says nothing.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerzero_serve.errors import ValidationError, check_int
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op
from layerzero_serve.selection._device import probe_device
from layerzero_serve.selection._selector import Selector, context_key, get_selector
from layerzero_serve.selection._timings import (
    Measurement,
    TimingTable,
    apply_device_timings,
    device_fingerprint,
    load_for,
    table_path,
)
from layerzero_serve.selection._tune_inputs import bind_call, build_inputs

logger = logging.getLogger("layerzero_serve")

MEASURED_OPS = (Op.ATTN_DECODE, Op.SAMPLING, Op.KV_WRITE, Op.ATTN_PREFILL)
INTERPRETED_BACKENDS = frozenset({"triton", "liger_kernel"})  # Triton kernels
MAX_REPS = 10_000

Progress = Callable[[int, int, str], None]  # (done, total, label of the step just finished)


@dataclass(frozen=True, slots=True)
class TuneSettings:
    """How to measure. ``reps`` timed calls in [1, 10000] after ``warmup`` in [0, 10000];
    ``context_len`` cached tokens per decode row (None: 1024 on a GPU, 256 on the CPU);
    ``prefill_len`` prompt tokens per prefill sequence; ``force`` re-measures entries the table
    already has; ``ops``: the ops to measure (names or ``Op``s among :data:`MEASURED_OPS`).

    CUDA graphs: a host record.
    """

    reps: int = 20
    warmup: int = 3
    context_len: int | None = None
    prefill_len: int = 256
    force: bool = False
    ops: tuple[Op, ...] = MEASURED_OPS

    def __post_init__(self) -> None:
        check_int("reps", self.reps, 1, MAX_REPS)
        check_int("warmup", self.warmup, 0, MAX_REPS)
        if self.context_len is not None:
            check_int("context_len", self.context_len, 1, 1 << 20)
        check_int("prefill_len", self.prefill_len, 1, 1 << 16)
        if not isinstance(self.force, bool):
            raise ValidationError("force", self.force, "a bool")
        allowed = f"a non-empty list of ops among {[o.value for o in MEASURED_OPS]}"
        if isinstance(self.ops, (str, Op)) or not isinstance(self.ops, Iterable):
            raise ValidationError("ops", self.ops, allowed)
        ops = []
        for o in self.ops:
            op = next((m for m in MEASURED_OPS if o == m or o == m.value), None)
            if op is None:
                raise ValidationError("ops", o, allowed)
            ops.append(op)
        if not ops:
            raise ValidationError("ops", self.ops, allowed)
        object.__setattr__(self, "ops", tuple(dict.fromkeys(ops)))


@dataclass(frozen=True, slots=True)
class PlanResult:
    """What tuning did for one plan: ``measured`` this run (failures included), ``kept``
    (already in the table), ``skipped`` (kernel -> why), ``fastest`` measured kernel, and
    ``not_measured``: why the whole plan was not measured (None when it was).

    CUDA graphs: a host record.
    """

    ctx: KernelContext
    measured: dict[str, Measurement]
    kept: tuple[str, ...]
    skipped: dict[str, str]
    fastest: str | None
    not_measured: str | None = None


@dataclass(slots=True)
class TuneReport:
    """The outcome of :func:`tune_device`: the table, where it was written, each plan's result.

    CUDA graphs: a host record.
    """

    table: TimingTable
    path: Path
    plans: list[PlanResult] = field(default_factory=list)

    def text_lines(self) -> list[str]:
        """What ``layerzero-serve tune`` prints: the table, the fastest kernel per op, and
        every kernel not measured (skipped or failed) with why."""
        measured = sum(len(r.measured) for r in self.plans)
        kept = sum(len(r.kept) for r in self.plans)
        lines = [
            f"table: {self.path} ({len(self.table)} entries; {measured} measured now, {kept} kept)",
            "fastest per op:",
        ]
        lines += [f"  {line}" for line in self.summary() or ["(nothing measured)"]]
        notes = {f"{k}: {why}" for r in self.plans for k, why in r.skipped.items()}
        notes |= {f"{r.ctx.op.value}: {r.not_measured}" for r in self.plans if r.not_measured}
        notes |= {
            f"{k}: failed: {m.error}" for r in self.plans for k, m in r.measured.items() if m.error
        }
        return lines + [f"  not measured: {n}" for n in sorted(notes)]

    def summary(self) -> list[str]:
        """One line per op: the fastest kernel and in how many of its plans (batch range)."""
        by_op: dict[Op, dict[str, list[int]]] = {}
        for r in self.plans:
            if r.fastest is not None:
                by_op.setdefault(r.ctx.op, {}).setdefault(r.fastest, []).append(r.ctx.batch_bucket)
        lines = []
        for op, winners in sorted(by_op.items(), key=lambda kv: list(Op).index(kv[0])):
            parts = [
                f"{k} ({len(b)} plan{'s' * (len(b) > 1)}, batch {min(b)}-{max(b)})"
                if len(b) > 1
                else f"{k} (batch {b[0]})"
                for k, b in sorted(winners.items(), key=lambda kv: -len(kv[1]))
            ]
            lines.append(f"{op.value}: " + ", ".join(parts))
        return lines


def summarize(seconds: list[float]) -> Measurement:
    """Median and p95 (nearest rank) of per-call times; a time of 0 (below the clock's
    resolution) counts as 1 ns so that it stays a usable measurement."""
    s = sorted(max(t, 1e-9) for t in seconds)
    p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]
    return Measurement(statistics.median(s), p95, len(s))


def time_call(
    fn: Callable[[], object], device: torch.device, reps: int, warmup: int
) -> Measurement:
    """Time ``fn()``: ``warmup`` untimed calls, then ``reps`` timed ones (CUDA events around
    each call on a GPU, ``perf_counter`` on the CPU)."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return summarize(out)


def _why_not_op(ctx: KernelContext, device: torch.device, st: TuneSettings) -> str | None:
    if ctx.op not in st.ops:
        if ctx.op in MEASURED_OPS:
            return "not among the ops asked for"
        return (
            "no synthetic inputs for it (measured: "
            + ", ".join(o.value for o in MEASURED_OPS)
            + ")"
        )
    if ctx.device_type != device.type:
        return f"a {ctx.device_type} plan cannot be measured on {device}"
    if ctx.op is Op.SAMPLING and ctx.vocab_size < 1:
        return "the plan has no vocabulary size"
    return None


def _why_not_kernel(spec: KernelSpec, device: torch.device) -> str | None:
    if spec.factory is None:
        return "no factory to build it"
    if spec.backend in INTERPRETED_BACKENDS and (
        device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"
    ):
        return "Triton kernel: it would run in the interpreter, whose time means nothing"
    return None


def _measure(spec: KernelSpec, ctx: KernelContext, inputs, device, st: TuneSettings) -> Measurement:
    """One kernel timed; a factory, input build (out of memory...) or call that raises is a
    failed measurement, not an error."""
    try:
        fn = bind_call(ctx.op, spec.factory(ctx), inputs())  # type: ignore[misc]
        return time_call(fn, device, st.reps, st.warmup)
    except Exception as e:  # noqa: BLE001 - one broken kernel must not stop the tuning
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        logger.warning("tuning %s for %s failed: %s", spec.name, context_key(ctx), msg)
        return Measurement(None, None, 0, msg)


def tune_plans(
    plans: Iterable[KernelContext],
    table: TimingTable,
    selector: Selector | None = None,
    settings: TuneSettings | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> list[PlanResult]:
    """Measure every runnable kernel of each plan into ``table`` (see the module docstring);
    entries already there are kept unless ``settings.force``. ``progress(done, total, label)``
    is called after each kernel. Returns one :class:`PlanResult` per plan.

    CUDA graphs: host only; runs kernels eagerly, never inside a capture.
    """
    plans = list(plans)
    if not all(isinstance(p, KernelContext) for p in plans):
        raise ValidationError("plans", plans, "an iterable of KernelContext")
    if not isinstance(table, TimingTable):
        raise ValidationError("table", table, "a TimingTable")
    if selector is not None and not isinstance(selector, Selector):
        raise ValidationError("selector", selector, "None or a Selector")
    sel = selector or get_selector()
    st = settings or TuneSettings()
    if not isinstance(st, TuneSettings):
        raise ValidationError("settings", settings, "None or a TuneSettings")
    if progress is not None and not callable(progress):
        raise ValidationError("progress", progress, "None or a callable(done, total, label)")
    dev = _device(device)
    work = [(p, _why_not_op(p, dev, st), sel.runnable(p.op, p)) for p in dict.fromkeys(plans)]
    total = sum(len(specs) for _, why, specs in work if why is None)
    done, results = 0, []
    for ctx, why_op, specs in work:
        key, measured, kept, skipped = context_key(ctx), {}, [], {}
        built: list[object] = []  # the plan's inputs, built at the first kernel measured

        def inputs(ctx=ctx, built=built) -> object:
            if not built:
                built.append(build_inputs(ctx, dev, st.context_len, st.prefill_len))
            return built[0]

        for spec in specs if why_op is None else ():
            old = table.get(spec.name, key)
            why = _why_not_kernel(spec, dev)
            if why is not None:
                skipped[spec.name] = why
            elif old is not None and old.ok and not st.force:
                kept.append(spec.name)
            else:
                measured[spec.name] = m = _measure(spec, ctx, inputs, dev, st)
                table.put(spec.name, key, m)
            done += 1
            if progress is not None:
                progress(done, total, f"{ctx.op.value} batch {ctx.batch_bucket} {spec.name}")
        built.clear()  # free this plan's tensors before the next plan's
        timed = {s.name: m.median_s for s in specs if (m := table.get(s.name, key)) and m.ok}
        fastest = min(timed, key=lambda n: (timed[n], n)) if timed else None
        results.append(PlanResult(ctx, measured, tuple(kept), skipped, fastest, why_op))
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the synthetic inputs' blocks go back (before KV sizing)
    return results


def _device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device (None: the current CUDA device, else the CPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValidationError("device", device, "None, 'cpu', 'cuda' or 'cuda:N'")
    return dev


def check_table_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a file we can read (when present) and write (its folder may
    be missing: it is created); else a ValidationError naming ``table_path``.

    CUDA graphs: host only.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValidationError("table_path", path, "a file path (str or os.PathLike)")
    path = Path(path)
    allowed = "a writable file path (its folder is created if missing)"
    if path.is_dir():
        raise ValidationError("table_path", str(path), allowed, "it is a directory")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ValidationError("table_path", str(path), allowed, "not readable and writable")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValidationError(
            "table_path", str(path), allowed, f"{parent} is not a writable folder"
        )
    return path


def tune_device(
    plans: Iterable[KernelContext],
    selector: Selector | None = None,
    path: str | os.PathLike | None = None,
    settings: TuneSettings | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> TuneReport:
    """Measure ``plans`` on ``device`` into its timing table, write it (atomically) and give it
    to ``selector`` (default: the process-wide one). The table at ``path`` (default: see
    ``selection._timings.table_path``) is extended when its fingerprint matches this machine,
    else replaced; entries of other plans are kept.

    CUDA graphs: host only; runs kernels eagerly, never inside a capture.
    """
    if selector is not None and not isinstance(selector, Selector):
        raise ValidationError("selector", selector, "None or a Selector")
    sel = selector or get_selector()
    dev = _device(device)
    info = probe_device(dev)
    where = table_path(info, path)
    if where is None:
        raise ValidationError(
            "table_path", None, "a file path", "LZ_TIMING_TABLE=off disables the default table"
        )
    check_table_path(where)
    fp = device_fingerprint(info, sel)
    table, _ = load_for(where, fp)
    if table is None or table.fingerprint is None:
        table = TimingTable(fp, {}, str(where))
    results = tune_plans(plans, table, sel, settings, dev, progress)
    table.save(where)
    sel.use_timings(table, f"{where} ({len(table)} entries, measured on this device)")
    return TuneReport(table, where, results)


def startup_timings(selector: Selector, device: torch.device, plans: list[KernelContext]) -> None:
    """At engine start-up: give ``selector`` the device's measured table if one matches (no
    measurement); with ``LZ_TUNE_AT_STARTUP=1`` also measure the ``plans`` the table lacks and
    save it. Never raises for a table problem (a warning is logged).

    CUDA graphs: host only; before any plan is selected or captured.
    """
    from layerzero_serve import _envs as envs

    try:
        if envs.tune_at_startup() and not envs.timings_disabled():
            report = tune_device(plans, selector, settings=TuneSettings(reps=10), device=device)
            logger.info("kernel timings measured at start-up: %s", report.path)
        else:
            apply_device_timings(selector, probe_device(device))
    except (OSError, ValidationError) as e:
        logger.warning("kernel timings not used: %s: %s", type(e).__name__, e)
