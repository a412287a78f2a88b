"""explain(): every candidate for a plan, chosen or rejected, with its reason, score and measured
time (median, p95) when the timing table has one, as text and JSON; whether the choice was made
by measurement; and where the timings came from (or why none apply)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.spec import KernelContext
from layerzero_serve.selection._device import DeviceInfo, backends_on
from layerzero_serve.selection._selector import (
    BackendState,
    Candidate,
    KernelChoice,
    SelectionError,
    Selector,
    get_selector,
)


@dataclass(frozen=True, slots=True)
class SelectionReport:
    """The decision for one plan (``choice``; None with ``error`` when no kernel can run it)
    and ``timings``: which timing table applied, or why none did."""

    ctx: KernelContext
    choice: KernelChoice | None
    error: str | None
    timings: str = ""

    def to_dict(self) -> dict:
        ctx = asdict(self.ctx)
        ctx["op"] = self.ctx.op.value
        cands = []
        if self.choice is not None:
            for c in self.choice.candidates:
                cands.append(
                    {
                        "kernel": c.name,
                        "backend": c.backend,
                        "chosen": c.chosen,
                        "score": c.score,
                        "reason_code": None if c.rejection is None else c.rejection.code.value,
                        "reason": None if c.rejection is None else c.rejection.message,
                        "median_s": c.median_s,
                        "p95_s": c.p95_s,
                        "timing_error": c.timing_error,
                    }
                )
        return {
            "context": ctx,
            "chosen": None if self.choice is None else self.choice.name,
            "locked": bool(self.choice and self.choice.locked),
            "by_measurement": bool(self.choice and self.choice.by_measurement),
            "timings": self.timings,
            "error": self.error,
            "candidates": cands,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def text(self) -> str:
        c = self.ctx
        where = "cpu" if c.device_type == "cpu" else f"{c.device_type} sm_{c.sm} ({c.generation})"
        head = (
            f"{c.op.value}: {where}, {c.dtype}, "
            f"head_dim {c.head_dim}, heads {c.num_q_heads}/{c.num_kv_heads}, "
            f"block {c.block_size}, batch {c.batch_bucket}, q_len {c.q_len}, "
            f"graph {'on' if c.graph_mode else 'off'}"
        )
        lines = [head]
        if self.timings:
            lines.append(f"  timings: {self.timings}")
        if self.error:
            lines.append(f"  ERROR: {self.error}")
        ch = self.choice
        if ch is not None:
            if ch.by_measurement:
                lines.append(
                    f"  chosen by measurement: {ch.name} has the fastest measured median "
                    "(priority and boosts order only unmeasured kernels)"
                )
            elif ch.locked:
                lines.append(f"  chosen by policy lock: {ch.name}")
            # "not measured" is worth saying where another candidate is, unless the label does
            note = not ch.by_measurement and any(c.median_s is not None for c in ch.candidates)
            for cand in sorted(ch.candidates, key=lambda x: _order(x, ch.by_measurement)):
                mark = "*" if cand.chosen else " "
                if cand.rejection is None:
                    lost = "lower"
                    if ch.by_measurement:  # measured: slower; unmeasured: ranked after them
                        lost = "slower" if cand.median_s else "unmeasured: ranks after measured"
                    why = f"score {cand.score:g}" + (" (chosen)" if cand.chosen else f" ({lost})")
                else:
                    why = str(cand.rejection)
                lines.append(f"  {mark} {cand.name:28s} [{cand.backend}] {why}{_time(cand, note)}")
        return "\n".join(lines)


def _order(c: Candidate, by_measurement: bool) -> tuple:
    """Chosen first, then runnable before rejected; then, as the decision went, measured
    (fastest first) before unmeasured, and by score."""
    timed = (c.median_s is None, c.median_s or 0) if by_measurement else ()
    return (not c.chosen, c.score is None, *timed, -(c.score or 0))


def _time(c: Candidate, note_unmeasured: bool) -> str:
    """The candidate's measured time, its tuning failure, or (``note_unmeasured``) that it has
    none."""
    if c.timing_error is not None:
        return f"; tuning failed: {c.timing_error}"
    if c.median_s is None:
        return "; not measured" if note_unmeasured and c.rejection is None else ""
    p95 = "" if c.p95_s is None else f", p95 {c.p95_s * 1e6:.1f} us"
    return f"; median {c.median_s * 1e6:.1f} us{p95}"


def explain(ctx: KernelContext, selector: Selector | None = None) -> SelectionReport:
    """Report for one plan: the chosen kernel and why each other candidate lost.

    CUDA graphs: host only.
    """
    if not isinstance(ctx, KernelContext):
        raise ValidationError("ctx", ctx, "a KernelContext")
    if selector is not None and not isinstance(selector, Selector):
        raise ValidationError("selector", selector, "None or a Selector")
    sel = selector or get_selector()
    try:
        return SelectionReport(ctx, sel.select(ctx.op, ctx), None, sel.timing_source)
    except SelectionError as e:
        return SelectionReport(ctx, None, str(e), sel.timing_source)


def selector_for(device: DeviceInfo, base: Selector | None = None) -> Selector:
    """A selector that decides as one on ``device`` would, with this machine's installed
    packages (:func:`~layerzero_serve.selection._device.backends_on`): planning for a fake
    device. It has ``base``'s kernels (default: the process-wide selector's) and no timing
    table, since timings measured here say nothing about ``device``.

    CUDA graphs: host only.
    """
    specs = (base or get_selector()).kernels()
    states = {
        n: BackendState(s.available, s.version, s.reason) for n, s in backends_on(device).items()
    }
    return Selector(specs=specs, backends=states, timings={})
