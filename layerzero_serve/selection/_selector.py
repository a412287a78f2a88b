"""select(op, ctx) -> KernelChoice: filter by constraints, availability, health and policy;
then decide by measured time where there is one, else by score; cache per context.

**How the winner is picked** among the candidates that survive the filters (a lock leaves only
the locked kernel; deny/allow reject before anything is compared):

1. When two or more of them have a usable measurement for this plan's context key in the
   timing table (:mod:`~layerzero_serve.selection._timings`), the fastest measured median wins,
   whatever the static priorities and policy boosts (ties: the higher score, then the name).
   Unmeasured candidates rank after measured ones: a kernel never timed on this device is not
   trusted to beat one that was (time it with ``layerzero-serve tune``, or lock it).
2. Otherwise (no table, or fewer than two measured) the score decides: ``priority + policy
   boosts`` (+ ``100 * best / t`` for a measured candidate, which with one measurement changes
   nothing), ties broken by name.

So boosts order the unmeasured kernels and never overturn a measurement; a lock always wins.
Deterministic for a given context, policy, registry, health state and table.
Called once per plan (start-up, each captured bucket), never per step or per layer; ``stats``
counts calls so tests can prove it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from layerzero_serve import _envs as envs
from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.spec import KernelContext, KernelSpec, Op, Reason, Rejection
from layerzero_serve.selection._policy import Policy, PolicyState
from layerzero_serve.selection._timings import Measurement, TimingTable, apply_env_table

if TYPE_CHECKING:
    from layerzero_serve.selection._device import DeviceInfo

logger = logging.getLogger("layerzero_serve")


class SelectionError(ValidationError):
    """No kernel can run the op here, or a locked kernel cannot."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One kernel considered for a plan: its score (None when rejected), why it was rejected,
    and its measured ``median_s`` / ``p95_s`` seconds per call when the timing table has them
    (``timing_error``: its tuning run raised)."""

    name: str
    backend: str
    score: float | None  # None when rejected
    rejection: Rejection | None
    chosen: bool = False
    median_s: float | None = None
    p95_s: float | None = None
    timing_error: str | None = None


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """The decision for one (op, context): the kernel and why every other candidate lost."""

    op: Op
    ctx: KernelContext
    spec: KernelSpec
    score: float
    locked: bool
    candidates: tuple[Candidate, ...]
    by_measurement: bool = False  # the fastest measured candidate won (see the module doc)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(slots=True)
class SelectorStats:
    select_calls: int = 0
    cold_selections: int = 0
    fallbacks: int = 0


@dataclass(frozen=True, slots=True)
class BackendState:
    available: bool
    version: str | None
    reason: str


def _probe_backends(name: str) -> BackendState:
    from layerzero_serve.kernels.registry import probe_backend

    st = probe_backend(name)
    return BackendState(st.available, st.version, st.reason)


def _default_specs() -> list[KernelSpec]:
    from layerzero_serve.kernels.registry import all_specs

    return list(all_specs())


@dataclass
class Selector:
    """Kernel registry + decision cache.

    Args:
        specs: the registry (default: every adapter's SPECS from kernels.catalog).
        backends: ``name -> BackendState`` (default: a real probe of the installed libraries);
            a Mapping gives a fixed availability set (tests, what-if planning).
        timings: a :class:`TimingTable` measured on this device, or the legacy mapping
            ``{kernel name: {context key: seconds}}``; where two or more eligible candidates
            have a timing, the fastest measured one wins (module docstring). None: the file
            ``LZ_TIMING_TABLE`` names, if any (checked against this device's fingerprint);
            the engine loads the device's table at start-up (``apply_device_timings``).
        policy: the :class:`PolicyState` it decides under; None: the process-wide one (that of
            :func:`get_selector`, which ``configure``/``prefer`` change). The process-wide
            selector always owns one: :func:`set_selector` hands it the policy of the selector
            it replaces, so a policy set before the swap still applies.
    """

    specs: list[KernelSpec] | None = None
    backends: Callable[[str], BackendState] | Mapping[str, BackendState] | None = None
    timings: Mapping[str, Mapping[str, float]] | TimingTable | None = None
    stats: SelectorStats = field(default_factory=SelectorStats)
    policy: PolicyState | None = None

    def __post_init__(self) -> None:
        if self.specs is not None and (
            isinstance(self.specs, (str, bytes, Mapping)) or not isinstance(self.specs, Iterable)
        ):
            raise ValidationError("specs", self.specs, "None or a list of KernelSpec")
        if self.backends is not None and not (
            isinstance(self.backends, Mapping) or callable(self.backends)
        ):
            raise ValidationError(
                "backends", self.backends, "None, a Mapping name -> BackendState or a callable"
            )
        if self.timings is not None and not isinstance(self.timings, (Mapping, TimingTable)):
            raise ValidationError("timings", self.timings, "None, a TimingTable or a Mapping")
        if self.policy is not None and not isinstance(self.policy, PolicyState):
            raise ValidationError("policy", self.policy, "None or a PolicyState")
        self._specs: dict[str, KernelSpec] = {}
        self._unhealthy: dict[str, str] = {}
        self._cache: dict[KernelContext, KernelChoice] = {}
        self._cache_stamp: tuple[PolicyState | None, int] = (None, -1)  # the policy it holds
        self._backend_cache: dict[str, BackendState] = {}
        self._backend_overrides: dict[str, BackendState] = {}
        # fake_device()'s stack while this is the process-wide selector: plan as if on the last
        self.fake_devices: list[DeviceInfo] = []
        for s in self.specs if self.specs is not None else _default_specs():
            self.register(s)
        # what explain() says about the timings: where they came from, or why none apply
        self.timing_source = "" if self.timings is None else "timings given to the Selector"
        if self.timings is None and envs.timing_table():
            apply_env_table(self, envs.timing_table())

    def use_timings(self, timings: TimingTable | Mapping | None, source: str = "") -> None:
        """Decide with ``timings`` from now on (None: without any); ``source`` is what
        ``explain`` shows about them. Cached decisions are dropped.

        CUDA graphs: host only; kernels already built (graphs already captured) keep theirs.
        """
        if timings is not None and not isinstance(timings, (Mapping, TimingTable)):
            raise ValidationError("timings", timings, "None, a TimingTable or a Mapping")
        if not isinstance(source, str):
            raise ValidationError("source", source, "a str")
        self.timings = timings
        self.timing_source = source
        self._bump()

    # ---- registry ----------------------------------------------------------------------------
    def register(self, spec: KernelSpec, replace: bool = False) -> None:
        """Add a kernel (for example a user's own Triton kernel)."""
        if not isinstance(spec, KernelSpec):
            raise ValidationError("spec", spec, "a KernelSpec")
        if not isinstance(replace, bool):
            raise ValidationError("replace", replace, "a bool")
        if spec.name in self._specs and not replace:
            raise ValidationError("spec.name", spec.name, "a name not already registered")
        self._specs[spec.name] = spec
        self._bump()

    def unregister(self, name: str) -> None:
        if not isinstance(name, str):
            raise ValidationError("name", name, "a kernel name (str)")
        self._specs.pop(name, None)
        self._bump()

    def kernels(self, op: Op | None = None) -> list[KernelSpec]:
        return sorted(
            (s for s in self._specs.values() if op is None or s.op == op), key=lambda s: s.name
        )

    def _bump(self) -> None:
        """Registry or health changed: every cached decision may be stale."""
        self._cache.clear()

    # ---- backends and health -----------------------------------------------------------------
    def register_backend(
        self, name: str, available: bool = True, version: str | None = None, reason: str = ""
    ) -> None:
        """Declare a backend the probe does not know (a user's own kernels, for example), or
        override the probe's verdict for one it does. Takes precedence over ``backends``."""
        if not isinstance(name, str) or not name.strip():
            raise ValidationError("name", name, "a non-empty backend name")
        if not isinstance(available, bool):
            raise ValidationError("available", available, "a bool")
        if version is not None and not isinstance(version, str):
            raise ValidationError("version", version, "None or a str")
        if not isinstance(reason, str):
            raise ValidationError("reason", reason, "a str")
        self._backend_overrides[name] = BackendState(available, version, reason)
        self._bump()

    def backend_state(self, name: str) -> BackendState:
        override = self._backend_overrides.get(name)
        if override is not None:
            return override
        if isinstance(self.backends, Mapping):
            return self.backends.get(name, BackendState(False, None, "not in the availability set"))
        st = self._backend_cache.get(name)
        if st is None:
            try:
                st = (self.backends or _probe_backends)(name)
            except Exception as e:  # noqa: BLE001 - one bad probe must not break selection
                st = BackendState(False, None, f"probe raised {type(e).__name__}: {e}")
            if not isinstance(st, BackendState):
                st = BackendState(False, None, f"probe returned {type(st).__name__}")
            self._backend_cache[name] = st
        return st

    def mark_unhealthy(self, backend: str, error: BaseException | str) -> None:
        """A backend raised at run time: automatic choices skip it from now on."""
        self._unhealthy[backend] = (
            f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        )
        self.stats.fallbacks += 1
        logger.warning("kernel backend %s marked unhealthy: %s", backend, self._unhealthy[backend])
        self._bump()

    def unhealthy(self) -> dict[str, str]:
        return dict(self._unhealthy)

    # ---- policy ------------------------------------------------------------------------------
    def policy_state(self) -> PolicyState:
        """The policy this selector decides under: its own, else the process-wide one."""
        if self.policy is not None:
            return self.policy
        return get_selector().policy  # type: ignore[return-value]  (the default owns one)

    # ---- selection ---------------------------------------------------------------------------
    def select(self, op: Op, ctx: KernelContext) -> KernelChoice:
        """The kernel for ``op`` in ``ctx`` (``ctx.op`` must equal ``op``). Cached."""
        if type(ctx) is not KernelContext and not isinstance(ctx, KernelContext):
            raise ValidationError("ctx", ctx, "a KernelContext")
        if ctx.op is not op:  # identity: the cheap common case; validate only when it differs
            _check_op(op, ctx)
        self.stats.select_calls += 1
        state = self.policy_state()
        held, ep = self._cache_stamp
        if held is not state or ep != state.epoch:
            self._cache.clear()
            self._cache_stamp = (state, state.epoch)
        hit = self._cache.get(ctx)
        if hit is not None:
            return hit
        choice = self._decide(ctx.op, ctx, state.effective())
        self._cache[ctx] = choice
        self.stats.cold_selections += 1
        return choice

    def _reject(
        self, spec: KernelSpec, ctx: KernelContext, pol: Policy, lock: str | None
    ) -> Rejection | None:
        if lock is not None and spec.name != lock:
            return Rejection(Reason.NOT_LOCKED, f"{ctx.op.value} is locked to {lock}")
        st = self.backend_state(spec.backend)
        if not st.available:
            return Rejection(Reason.BACKEND_UNAVAILABLE, f"{spec.backend}: {st.reason}")
        if spec.backend in self._unhealthy:
            return Rejection(
                Reason.BACKEND_UNHEALTHY,
                f"{spec.backend} failed at run time: {self._unhealthy[spec.backend]}",
            )
        if lock is None:
            pat = pol.denied(spec)
            if pat is not None:
                return Rejection(Reason.DENIED_BY_POLICY, f"denied by pattern {pat!r}")
            if not pol.allowed(spec):
                return Rejection(
                    Reason.NOT_ALLOWED_BY_POLICY, f"not in the allow list {list(pol.allow)}"
                )
        return spec.supports(ctx)

    def measurement(self, kernel: str, ctx: KernelContext | str) -> Measurement | None:
        """The timing of ``kernel`` in ``ctx`` (or a context key) from the table, if any."""
        t = self.timings
        if t is None:
            return None
        key = ctx if isinstance(ctx, str) else context_key(ctx)
        if isinstance(t, TimingTable):
            return t.get(kernel, key)
        per_key = t.get(kernel)
        value = per_key.get(key) if isinstance(per_key, Mapping) else None
        if isinstance(value, Measurement):
            return value
        # a legacy number; a malformed entry (not a positive finite number) is ignored
        return Measurement.from_json(value) if value is not None else None

    def runnable(self, op: Op, ctx: KernelContext) -> list[KernelSpec]:
        """The kernels that can run ``op`` in ``ctx`` here (constraints, availability, health),
        whatever the policy: what ``layerzero-serve tune`` measures. Host only."""
        _check_op(op, ctx)
        empty = Policy()
        return [s for s in self.kernels(ctx.op) if self._reject(s, ctx, empty, None) is None]

    def _decide(self, op: Op, ctx: KernelContext, pol: Policy) -> KernelChoice:
        lock = pol.locks.get(op)
        specs = self.kernels(op)
        if lock is not None and lock not in self._specs:
            raise SelectionError(
                f"lock.{op.value}",
                lock,
                f"a registered {op.value} kernel: {[s.name for s in specs]}",
            )
        rejections = {s.name: self._reject(s, ctx, pol, lock) for s in specs}
        ok = [s for s in specs if rejections[s.name] is None]
        key = context_key(ctx) if self.timings else ""
        meas = {s.name: self.measurement(s.name, key) for s in specs} if key else {}
        timed = {s.name: m.median_s for s in ok if (m := meas.get(s.name)) is not None and m.ok}
        by_time = len(timed) >= 2
        fastest = min(timed.values()) if by_time else 0.0
        scores = {
            s.name: s.priority
            + pol.boost(s)
            + (100.0 * fastest / timed[s.name] if by_time and s.name in timed else 0.0)
            for s in ok
        }
        if not ok:
            if lock is not None:
                raise SelectionError(
                    f"lock.{op.value}",
                    lock,
                    "a kernel that can run here",
                    f"it cannot: {rejections[lock]}",
                )
            why = "; ".join(f"{n}: {r}" for n, r in rejections.items()) or "none registered"
            raise SelectionError("op", op.value, "an op with a runnable kernel", why)
        if by_time:  # the fastest measured wins; equal times: the higher score, then the name
            best = max(
                (s for s in ok if s.name in timed),
                key=lambda s: (-timed[s.name], scores[s.name], s.name),
            )
        else:
            best = max(ok, key=lambda s: (scores[s.name], s.name))
        cands = tuple(_candidate(s, scores, rejections, best, meas.get(s.name)) for s in specs)
        return KernelChoice(op, ctx, best, scores[best.name], lock is not None, cands, by_time)

    # ---- run-time fallback -------------------------------------------------------------------
    def build(self, op: Op, ctx: KernelContext) -> tuple[KernelChoice, object]:
        """``(choice, implementation)``: the selected kernel's ``factory(ctx)`` (None without a
        factory). A factory that raises on an automatic choice marks its backend unhealthy and
        the next candidate is built; a locked choice re-raises."""

        def make(choice: KernelChoice) -> tuple[KernelChoice, object]:
            factory = choice.spec.factory
            return choice, (factory(ctx) if factory is not None else None)

        return self.run_with_fallback(op, ctx, make)  # type: ignore[return-value]

    def run_with_fallback(self, op: Op, ctx: KernelContext, call: Callable[[KernelChoice], object]):
        """``call(choice)`` with the selected kernel; if it raises and the choice was automatic,
        mark the backend unhealthy and retry with the next candidate. A locked choice re-raises,
        and so does a retry that lands on a backend already tried (no progress: bounded by the
        number of backends). Host only; CUDA graphs: never called inside a capture."""
        tried: set[str] = set()
        while True:
            choice = self.select(op, ctx)
            try:
                return call(choice)
            except Exception as e:
                backend = choice.spec.backend
                if choice.locked or backend in tried:
                    raise
                tried.add(backend)
                self.mark_unhealthy(backend, e)


def _candidate(
    s: KernelSpec,
    scores: dict[str, float],
    rejections: dict[str, Rejection | None],
    best: KernelSpec,
    m: Measurement | None,
) -> Candidate:
    ok = m is not None and m.ok
    return Candidate(
        s.name,
        s.backend,
        scores.get(s.name),
        rejections[s.name],
        s.name == best.name,
        m.median_s if ok else None,
        m.p95_s if ok else None,
        m.error if m is not None else None,
    )


def _check_op(op: object, ctx: KernelContext) -> None:
    """``op`` is an Op (or its string value) equal to ``ctx.op``, else a ValidationError."""
    if not isinstance(op, str):
        raise ValidationError("op", op, f"an Op: {[o.value for o in Op]}")
    try:
        op = Op(op)
    except ValueError:
        raise ValidationError("op", op, f"an Op: {[o.value for o in Op]}") from None
    if ctx.op is not op:
        raise ValidationError("ctx.op", ctx.op.value, f"equal to the op asked for ({op.value})")


def context_key(ctx: KernelContext) -> str:
    """Stable text key of a context for timing tables (an FP8 KV cache's plans get their own
    keys: timings measured on a cache in the model's dtype do not rank them)."""
    key = (
        f"{ctx.op.value}|{ctx.dtype}|d{ctx.head_dim}|h{ctx.num_q_heads}/{ctx.num_kv_heads}"
        f"|bs{ctx.block_size}|b{ctx.batch_bucket}|q{ctx.q_len}|g{int(ctx.graph_mode)}"
    )
    return key if ctx.kv_dtype == "auto" else f"{key}|kv{ctx.kv_dtype}"


# The one piece of module state of the selection package: the process-wide selector, which owns
# the process-wide policy (and the planning device of ``fake_device``).
_default: list[Selector] = []


def get_selector() -> Selector:
    """The process-wide selector (created on first use, with a fresh policy)."""
    if not _default:
        _default.append(Selector(policy=PolicyState()))
    return _default[0]


def set_selector(selector: Selector | None) -> None:
    """Replace (or with None, reset) the process-wide selector. A selector without a policy of
    its own takes over the policy and planning device of the one it replaces; None drops them
    too (the next :func:`get_selector` starts with a fresh policy)."""
    if selector is not None and not isinstance(selector, Selector):
        raise ValidationError("selector", selector, "None or a Selector")
    old = _default[0] if _default else None
    _default.clear()
    if selector is None:
        return
    if selector.policy is None:
        selector.policy = old.policy if old is not None else PolicyState()
    if old is not None and old is not selector and not selector.fake_devices:
        selector.fake_devices = old.fake_devices
    _default.append(selector)


def peek_selector() -> Selector | None:
    """The process-wide selector if one exists (never creates it)."""
    return _default[0] if _default else None
