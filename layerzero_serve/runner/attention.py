"""The runtime's attention interface: what every model attention layer calls.

``AttentionDispatch(kv_cache, kernels)`` holds one implementation per phase, chosen by the
selection engine once per plan (decode, prefill/mixed). Each step, ``begin_step(meta)`` picks
the phase's implementation and runs its host-side ``plan``; each layer then calls
``dispatch(layer_idx, q, k, v, meta)``, which writes this step's K/V into the paged cache
through ``meta.slot_mapping`` (with the ``Op.KV_WRITE`` kernel selected for the plan, or the
attention kernel's own ``write_kv`` when none is given) and attends through
``meta.block_tables``. No selection happens per step or per layer.

**Faults.** A kernel's ``plan``, ``write`` or ``run`` that raises, or a ``run`` whose output is
not a tensor of the query's shape, dtype and device (``KernelOutputError``), propagates out of
``begin_step`` / the layer call; ``culprit()`` then names the kernel to blame (None when the
exception came from elsewhere in the model), so the caller (the model runner) can mark its
backend unhealthy and fall back to the next candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerzero_serve.errors import KernelOutputError
from layerzero_serve.kernels.attention_api import KVWriter, PagedAttentionImpl
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext
from layerzero_serve.kv_cache import KVCache
from layerzero_serve.runner._kv_fp8 import FP8KVScaling
from layerzero_serve.selection import KernelChoice


@dataclass(slots=True)
class PhaseKernel:
    choice: KernelChoice
    impl: PagedAttentionImpl


@dataclass(slots=True)
class WriterKernel:
    choice: KernelChoice
    impl: KVWriter


def select_dispatch(
    kv_cache: KVCache,
    selector,
    attention: KernelContext,
    kv_write: KernelContext,
    prefill: KernelContext | None = None,
) -> AttentionDispatch:
    """An AttentionDispatch whose kernels the selection engine picks, once, for the given plans:
    ``attention`` (decode or verification), ``kv_write``, and ``prefill`` (None: the attention
    kernel serves every phase, as in a captured bucket)."""

    def pick(ctx: KernelContext):
        return selector.build(ctx.op, ctx)  # a factory that raises: the next candidate

    first = PhaseKernel(*pick(attention))
    second = first if prefill is None else PhaseKernel(*pick(prefill))
    return AttentionDispatch(kv_cache, first, second, WriterKernel(*pick(kv_write)))


def build_attention(
    kv_cache: KVCache,
    num_q_heads: int,
    device: torch.device | str,
    max_num_seqs: int = 256,
    selector=None,
    graph_batch: int | None = None,
) -> AttentionDispatch:
    """An AttentionDispatch over ``kv_cache`` with the decode, prefill and KV-write kernels the
    selection engine picks for this device and shape (once, here).

    Args:
        kv_cache: the paged cache (its spec gives dtype, head dim, KV heads, block size).
        num_q_heads: query heads of the model (GQA ratio = num_q_heads / kv heads).
        device: the model's device.
        max_num_seqs: batch bound of the eager plans.
        selector: a ``Selector`` (default: the process-wide one).
        graph_batch: build the kernels of one CUDA-graph bucket of this size instead (graph
            mode plans; decode only).

    CUDA graphs: selection runs here, on the host, once; with ``graph_batch`` every kernel chosen is
    graph-safe.
    """
    from layerzero_serve.errors import ValidationError
    from layerzero_serve.kernels.spec import Op
    from layerzero_serve.selection import get_selector, probe_device
    from layerzero_serve.selection.plans import ModelShape, base_context

    spec = kv_cache.spec
    hkv = spec.num_kv_heads
    ok = isinstance(num_q_heads, int) and not isinstance(num_q_heads, bool)
    if not ok or num_q_heads < 1 or num_q_heads % hkv:
        raise ValidationError("num_q_heads", num_q_heads, f"a positive multiple of {hkv}")
    shape = ModelShape(
        str(spec.dtype).removeprefix("torch."),
        spec.head_dim,
        num_q_heads,
        spec.num_kv_heads,
        0,
        spec.kv_dtype,
    )
    dev = probe_device(torch.device(device))
    graph = graph_batch is not None
    batch = graph_batch if graph else max_num_seqs

    def ctx(op: Op, q_len: int) -> KernelContext:
        return base_context(
            op,
            device=dev,
            shape=shape,
            block_size=spec.block_size,
            batch_bucket=batch,
            q_len=q_len,
            graph_mode=graph,
        )

    prefill = None if graph else ctx(Op.ATTN_PREFILL, 0)
    return select_dispatch(
        kv_cache,
        selector or get_selector(),
        ctx(Op.ATTN_DECODE, 1),
        ctx(Op.KV_WRITE, int(graph)),
        prefill,
    )


class AttentionDispatch:
    """Callable attention over a KVCache with per-phase kernels.

    Shapes: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]`` in q's dtype.

    CUDA graphs: ``begin_step`` is host work before each step, outside capture. The per-layer call
    is what ``DecodeGraphRunner`` captures, with the kernels of a dispatch built for its bucket
    (``build_attention(..., graph_batch=b)``, all graph-safe); an eager dispatch may hold kernels
    that are not.
    """

    def __init__(
        self,
        kv_cache: KVCache,
        decode: PhaseKernel,
        prefill: PhaseKernel,
        writer: WriterKernel | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.decode = decode
        self.prefill = prefill
        self.writer = writer
        self._active = prefill
        self._write = None if writer is None else writer.impl.write
        self.failed: KernelChoice | None = None  # the kernel that raised (``culprit``)
        self._planned: AttentionMetadata | None = None
        # FP8 cache: the scales go around the kernels (None: the model's dtype, no extra work)
        self._fp8 = FP8KVScaling(kv_cache) if kv_cache.spec.is_fp8 else None

    @property
    def name(self) -> str:
        names = f"decode={self.decode.choice.name}, prefill={self.prefill.choice.name}"
        if self.writer is not None:
            names += f", kv_write={self.writer.choice.name}"
        return names

    def begin_step(self, meta: AttentionMetadata) -> PhaseKernel:
        """Pick the phase's kernel and plan it (host work, once per step, outside graphs).
        A ``plan`` that raises propagates; ``culprit()`` then names the kernel that raised."""
        self.failed = None
        self._planned = None
        self._active = (
            self.decode
            if meta.is_decode_only and (meta.num_tokens == meta.num_seqs)
            else self.prefill
        )
        for kernel in (self._active, self.writer):
            if kernel is not None:
                try:
                    kernel.impl.plan(meta)
                except Exception:
                    self.failed = kernel.choice
                    raise
        self._planned = meta
        return self._active

    @property
    def active(self) -> PhaseKernel:
        """The phase kernel the last ``begin_step`` chose (host only)."""
        return self._active

    def culprit(self) -> KernelChoice | None:
        """The kernel whose ``plan``, ``write`` or ``run`` raised (or returned junk) in the
        exception that just left ``begin_step`` or a layer call; None when the exception did
        not come from a kernel of this dispatch. Host only."""
        return self.failed

    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if meta is not self._planned:  # one identity check: a forgotten begin_step is an error
            raise RuntimeError(
                "AttentionDispatch: call begin_step(meta) with this step's metadata before the "
                "layers run (the kernels were planned for another step)"
            )
        phase = self._active
        cache = wcache = self.kv_cache.tensors[layer_idx]
        fp8 = self._fp8
        if fp8 is not None:  # K/V as FP8 bytes, the query scaled by s_k (see _kv_fp8)
            q, k, v, wcache = fp8.before(layer_idx, q, k, v)
        try:  # zero-cost unless it raises
            if self._write is None:
                phase.impl.write_kv(k, v, wcache, meta)
            else:
                try:
                    self._write(k, v, wcache, meta)
                except Exception:
                    self.failed = self.writer.choice
                    raise
            out = phase.impl.run(q, cache, meta)
        except Exception:
            self.failed = self.failed or phase.choice
            raise
        # host metadata only (graph-safe): a plug-in's junk must not flow on silently. Checked
        # at the first layer of each step: an output's form does not depend on the layer, and
        # the per-layer path stays free of it.
        if layer_idx == 0 and (
            not isinstance(out, torch.Tensor)
            or out.shape != q.shape
            or out.dtype != q.dtype
            or out.device != q.device
        ):
            self.failed = phase.choice
            got = (
                f"{out.dtype} {tuple(out.shape)} on {out.device}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise KernelOutputError(
                f"attention kernel {phase.choice.name} returned {got}; expected "
                f"{q.dtype} {tuple(q.shape)} on {q.device} (the query's)"
            )
        return out if fp8 is None else fp8.after(layer_idx, out)
