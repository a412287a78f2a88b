"""explain(): every candidate for a plan, chosen or rejected, with its reason and score, as text
and JSON; and the selection table of a model's plans (``layerzero-serve doctor``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.spec import KernelContext
from layerzero_serve.selection._device import DeviceInfo, backends_on
from layerzero_serve.selection._selector import (
    BackendState,
    KernelChoice,
    SelectionError,
    Selector,
    get_selector,
)


@dataclass(frozen=True, slots=True)
class SelectionReport:
    ctx: KernelContext
    choice: KernelChoice | None
    error: str | None

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
                    }
                )
        return {
            "context": ctx,
            "chosen": None if self.choice is None else self.choice.name,
            "locked": bool(self.choice and self.choice.locked),
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
        if self.error:
            lines.append(f"  ERROR: {self.error}")
        if self.choice is not None:
            for cand in sorted(
                self.choice.candidates,
                key=lambda x: (not x.chosen, x.score is None, -(x.score or 0)),
            ):
                mark = "*" if cand.chosen else " "
                if cand.rejection is None:
                    why = f"score {cand.score:g}" + (" (chosen)" if cand.chosen else " (lower)")
                else:
                    why = str(cand.rejection)
                lines.append(f"  {mark} {cand.name:28s} [{cand.backend}] {why}")
        return "\n".join(lines)


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
        return SelectionReport(ctx, sel.select(ctx.op, ctx), None)
    except SelectionError as e:
        return SelectionReport(ctx, None, str(e))


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
