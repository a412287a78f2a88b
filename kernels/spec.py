"""What a kernel declares about itself: the op it implements, its backend, and the contexts it
can run in. A leaf module (no runtime imports) so every adapter in kernels/ can declare specs
and the selection engine can read them.

``KernelSpec.supports(ctx)`` returns None when the kernel can run in ``ctx``, else a
``Rejection`` with a stable reason code and a human-readable message.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from layerzero_serve.errors import ValidationError, check_int


class Op(str, enum.Enum):
    """The operations a kernel can implement; the selection engine picks one kernel per op and
    plan (``KernelContext``). Values are the names used in policies and reports.

    CUDA graphs: a name; whether an op's kernel may be captured is its ``KernelSpec.graph_safe``.
    """

    ATTN_PREFILL = "attention_prefill"
    ATTN_DECODE = "attention_decode"
    ATTN_VERIFY = "attention_verify"
    KV_WRITE = "kv_write"
    SAMPLING = "sampling"
    REJECTION_SAMPLING = "rejection_sampling"
    RMSNORM = "rmsnorm"
    ROPE = "rope"
    SWIGLU = "swiglu"


GENERATIONS = ("cpu", "turing", "ampere", "ada", "hopper", "blackwell", "unknown")
DEVICE_TYPES = ("cuda", "cpu")
DTYPES = ("float32", "bfloat16", "float16")
#: KV cache storage: "auto" (the model's dtype) or FP8 with per-tensor scales.
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
#: Ops that read the paged KV cache, and so must know how it is stored.
KV_READ_OPS = frozenset({Op.ATTN_PREFILL, Op.ATTN_DECODE, Op.ATTN_VERIFY})


class Reason(str, enum.Enum):
    """Stable reason codes (part of the public contract: tools may match on them)."""

    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_UNHEALTHY = "backend_unhealthy"
    DEVICE_TYPE = "device_type"
    SM_TOO_OLD = "sm_too_old"
    GENERATION = "generation"
    DTYPE = "dtype"
    KV_DTYPE = "kv_dtype"
    HEAD_DIM = "head_dim"
    BLOCK_SIZE = "block_size"
    GQA_RATIO = "gqa_ratio"
    BATCH_TOO_LARGE = "batch_too_large"
    Q_LEN = "q_len"
    NOT_GRAPH_SAFE = "not_graph_safe"
    DENIED_BY_POLICY = "denied_by_policy"
    NOT_ALLOWED_BY_POLICY = "not_allowed_by_policy"
    NOT_LOCKED = "not_locked"
    CUSTOM = "custom"


@dataclass(frozen=True, slots=True)
class Rejection:
    code: Reason
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, Reason):
            object.__setattr__(self, "code", _enum(Reason, "Rejection.code", self.code))
        if not isinstance(self.message, str):
            raise ValidationError("Rejection.message", self.message, "a str")

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


# ---- validation helpers (construction time only; never on the selection hot path) -----------
def _enum(cls: type[enum.Enum], param: str, value: object):
    """``value`` as a member of ``cls`` (a member or its string value)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value)
        except ValueError:
            pass
    raise ValidationError(param, value, f"a {cls.__name__} or one of {[m.value for m in cls]}")


def _name(param: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(param, value, "a non-empty str")
    return value


def _choice(param: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValidationError(param, value, f"one of {list(allowed)}")
    return value


def _value_set(
    param: str, value: object, allowed: tuple[str, ...] | None = None
) -> frozenset | None:
    """None (any) or a non-empty collection -> frozenset; elements are names from ``allowed``
    or, when ``allowed`` is None, ints >= 0. A bare str is rejected (it would substring-match)."""
    if value is None:
        return None
    what = f"one of {list(allowed)}" if allowed is not None else "ints >= 0"
    expected = f"None or a non-empty set/frozenset/tuple/list of {what}"
    if not isinstance(value, (frozenset, set, tuple, list, range)):
        raise ValidationError(param, value, expected)
    if not value:
        raise ValidationError(param, value, expected, "empty: the kernel could never run")
    for v in value:
        if allowed is not None:
            if not isinstance(v, str) or v not in allowed:
                raise ValidationError(param, value, expected, f"bad element {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValidationError(param, value, expected, f"bad element {v!r}")
    return value if isinstance(value, frozenset) else frozenset(value)


@dataclass(frozen=True, slots=True)
class KernelContext:
    """One plan: what the op must handle. Hashable; the selection cache key. Validated at
    construction (``ValidationError`` naming the field); ``op`` may be given as its string value.

    Attributes:
        op: the operation.
        device_type: one of DEVICE_TYPES ("cuda", "cpu").
        sm: compute capability as major*10+minor (90 = Hopper), 0 on CPU.
        generation: one of GENERATIONS.
        dtype: one of DTYPES ("float32" | "bfloat16" | "float16").
        head_dim, num_q_heads, num_kv_heads: attention shape (0 when not applicable).
        block_size: KV block (page) size in tokens (0 when not applicable).
        batch_bucket: the batch size bucket of the plan (padded batch).
        q_len: tokens per request (1 decode, k+1 verify, 0 = variable, prefill).
        graph_mode: the kernel will be replayed inside a captured CUDA graph.
        vocab_size: for sampling ops (0 otherwise).
        kv_dtype: one of KV_DTYPES, how the paged KV cache is stored ("auto": in ``dtype``).

    CUDA graphs: a host object; ``graph_mode`` asks the selection engine for kernels that may be
    captured.
    """

    op: Op
    device_type: str = "cuda"
    sm: int = 90
    generation: str = "hopper"
    dtype: str = "bfloat16"
    head_dim: int = 128
    num_q_heads: int = 32
    num_kv_heads: int = 8
    block_size: int = 16
    batch_bucket: int = 1
    q_len: int = 1
    graph_mode: bool = False
    vocab_size: int = 0
    kv_dtype: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.op, Op):
            object.__setattr__(self, "op", _enum(Op, "KernelContext.op", self.op))
        _choice("KernelContext.device_type", self.device_type, DEVICE_TYPES)
        _choice("KernelContext.kv_dtype", self.kv_dtype, KV_DTYPES)
        object.__setattr__(self, "sm", check_int("KernelContext.sm", self.sm, 0))
        _choice("KernelContext.generation", self.generation, GENERATIONS)
        _choice("KernelContext.dtype", self.dtype, DTYPES)
        for f in _CTX_INTS:
            object.__setattr__(self, f, check_int(f"KernelContext.{f}", getattr(self, f), 0))
        if not isinstance(self.graph_mode, bool):
            raise ValidationError("KernelContext.graph_mode", self.graph_mode, "a bool")

    @property
    def gqa_ratio(self) -> int:
        return self.num_q_heads // self.num_kv_heads if self.num_kv_heads else 0


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """A kernel's declaration. ``None`` in a constraint field means "any".

    Validated at construction (``ValidationError`` naming the field): constraint fields take
    None or a non-empty set/frozenset/tuple/list (a bare str is rejected) and are normalised
    to frozensets; ``op`` may be given as its string value.

    Attributes:
        name: unique kernel name (``flashinfer.decode``...).
        op: the op it implements.
        backend: the backend (library) it comes from; its availability gates the kernel.
        priority: base score; higher wins.
        graph_safe: may run inside a captured CUDA graph.
        device_types: device types it runs on (``DEVICE_TYPES``).
        dtypes, head_dims, block_sizes, gqa_ratios: allowed values.
        min_sm: lowest compute capability (major*10+minor).
        generations: allowed GPU generations.
        max_batch: largest batch bucket.
        q_lens: allowed tokens per request (0 = variable-length prefill).
        kv_dtypes: KV cache storages (``KV_DTYPES``) the kernel reads, for the ops in
            ``KV_READ_OPS``; None: "auto" only (the model's dtype). An FP8 cache reaches the
            kernel with the per-tensor scales folded into the query and the output, so a
            kernel that declares FP8 only casts the stored values to its compute dtype.
        check: extra predicate returning a Rejection or None (for rules the fields cannot say);
            one that raises or returns anything else rejects the kernel (``Reason.CUSTOM``).
        factory: builds the implementation (``factory(ctx) -> object``), imported lazily.
        doc: where the constraints come from.

    CUDA graphs: a host object; ``graph_safe`` declares whether the kernel may be captured (no host
    sync; its launches depend only on the plan and the shapes).
    """

    name: str
    op: Op
    backend: str
    priority: int = 0
    graph_safe: bool = False
    device_types: frozenset[str] | None = frozenset({"cuda"})
    dtypes: frozenset[str] | None = None
    head_dims: frozenset[int] | None = None
    block_sizes: frozenset[int] | None = None
    gqa_ratios: frozenset[int] | None = None
    min_sm: int = 0
    generations: frozenset[str] | None = None
    max_batch: int | None = None
    q_lens: frozenset[int] | None = None
    kv_dtypes: frozenset[str] | None = None
    check: Callable[[KernelContext], Rejection | None] | None = field(default=None, compare=False)
    factory: Callable[[KernelContext], object] | None = field(default=None, compare=False)
    doc: str = ""

    def __post_init__(self) -> None:
        _name("KernelSpec.name", self.name)
        if not isinstance(self.op, Op):
            object.__setattr__(self, "op", _enum(Op, "KernelSpec.op", self.op))
        _name("KernelSpec.backend", self.backend)
        p = self.priority
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
            raise ValidationError("KernelSpec.priority", p, "an int or a finite float")
        if not isinstance(self.graph_safe, bool):
            raise ValidationError("KernelSpec.graph_safe", self.graph_safe, "a bool")
        for f, allowed in _SPEC_SETS:
            v = getattr(self, f)
            norm = _value_set(f"KernelSpec.{f}", v, allowed)
            if norm is not v:
                object.__setattr__(self, f, norm)
        object.__setattr__(self, "min_sm", check_int("KernelSpec.min_sm", self.min_sm, 0))
        if self.max_batch is not None:
            object.__setattr__(
                self, "max_batch", check_int("KernelSpec.max_batch", self.max_batch, 1)
            )
        for f in ("check", "factory"):
            v = getattr(self, f)
            if v is not None and not callable(v):
                raise ValidationError(
                    f"KernelSpec.{f}", v, "None or a callable taking a KernelContext"
                )
        if not isinstance(self.doc, str):
            raise ValidationError("KernelSpec.doc", self.doc, "a str")

    def supports(self, ctx: KernelContext) -> Rejection | None:
        """None if the kernel can run in ``ctx``; else the first reason it cannot."""
        if self.device_types is not None and ctx.device_type not in self.device_types:
            return Rejection(
                Reason.DEVICE_TYPE, f"runs on {sorted(self.device_types)}, not {ctx.device_type}"
            )
        if ctx.device_type == "cuda" and ctx.sm < self.min_sm:
            return Rejection(Reason.SM_TOO_OLD, f"needs sm_{self.min_sm}+, device is sm_{ctx.sm}")
        if self.generations is not None and ctx.generation not in self.generations:
            return Rejection(
                Reason.GENERATION, f"supports {sorted(self.generations)}, not {ctx.generation}"
            )
        if self.dtypes is not None and ctx.dtype not in self.dtypes:
            return Rejection(Reason.DTYPE, f"dtype {ctx.dtype} not in {sorted(self.dtypes)}")
        if self.head_dims is not None and ctx.head_dim not in self.head_dims:
            return Rejection(
                Reason.HEAD_DIM, f"head_dim {ctx.head_dim} not in {sorted(self.head_dims)}"
            )
        if self.block_sizes is not None and ctx.block_size not in self.block_sizes:
            return Rejection(
                Reason.BLOCK_SIZE, f"block_size {ctx.block_size} not in {sorted(self.block_sizes)}"
            )
        if self.gqa_ratios is not None and ctx.gqa_ratio not in self.gqa_ratios:
            return Rejection(
                Reason.GQA_RATIO, f"GQA ratio {ctx.gqa_ratio} not in {sorted(self.gqa_ratios)}"
            )
        if self.max_batch is not None and ctx.batch_bucket > self.max_batch:
            return Rejection(
                Reason.BATCH_TOO_LARGE, f"batch {ctx.batch_bucket} > max {self.max_batch}"
            )
        if self.q_lens is not None and ctx.q_len not in self.q_lens:
            return Rejection(Reason.Q_LEN, f"q_len {ctx.q_len} not in {sorted(self.q_lens)}")
        if ctx.kv_dtype != "auto" and self.op in KV_READ_OPS:
            kv = self.kv_dtypes or frozenset({"auto"})  # None: reads the model's dtype only
            if ctx.kv_dtype not in kv:
                return Rejection(
                    Reason.KV_DTYPE,
                    f"does not read a {ctx.kv_dtype} KV cache (reads {sorted(kv)})",
                )
        if ctx.graph_mode and not self.graph_safe:
            return Rejection(Reason.NOT_GRAPH_SAFE, "cannot run inside a captured CUDA graph")
        if self.check is not None:
            return self._run_check(ctx)
        return None

    def _run_check(self, ctx: KernelContext) -> Rejection | None:
        """The user predicate, contained: an exception or a result that is neither None nor a
        Rejection rejects this kernel (Reason.CUSTOM) instead of breaking selection."""
        try:
            out = self.check(ctx)  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - a broken user check must not break selection
            return Rejection(Reason.CUSTOM, f"check raised {type(e).__name__}: {e}")
        if out is None or isinstance(out, Rejection):
            return out
        return Rejection(
            Reason.CUSTOM, f"check returned {type(out).__name__} {out!r:.80}, not None/Rejection"
        )


_CTX_INTS = (
    "head_dim",
    "num_q_heads",
    "num_kv_heads",
    "block_size",
    "batch_bucket",
    "q_len",
    "vocab_size",
)
_SPEC_SETS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("device_types", DEVICE_TYPES),
    ("dtypes", DTYPES),
    ("head_dims", None),
    ("block_sizes", None),
    ("gqa_ratios", None),
    ("generations", GENERATIONS),
    ("q_lens", None),
    ("kv_dtypes", KV_DTYPES),
)
