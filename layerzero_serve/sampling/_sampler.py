"""The sampler: ``prepare()`` once per step on the host, ``sample()`` on the device.

* ``prepare(requests)`` turns the rows' parameters into device tensors: a host gather from the
  per-request table, one copy of a packed pinned buffer (see ``batch``), the step's table
  updates (``slot_ops``) and the plan, i.e. which stages ``sample()`` runs and whether the batch
  needs a position-invariant kernel (any seeded row), decided on the host.
* ``sample(logits, batch)`` runs without host synchronisation (CUDA-graph safe): processors,
  one row reduction for the max and the failure flags, then greedy argmax (all-greedy batches
  stop there) or temperature -> softmax -> the sampling kernel, then logprobs, packed for one
  device-to-host copy (``DeviceSample.to_host()``). It advances every row's device ``offset``,
  so a replayed graph draws fresh numbers even without a new ``prepare``.

**Randomness.** Each row draws from ``counter_uniform(seed, offset)`` (kernels.sampling_api):
``offset`` is the request's output length, ``seed`` the request's seed, or for an unseeded
request one drawn from the sampler's own generator at admission. A seeded request therefore
gives the same tokens at any batch position and with any batch mates.

**Failures.** A row whose processed logits contain NaN / ``+inf`` or are all ``-inf`` is
flagged (``HostSample.failed``); its token is 0 and it is sanitised before the softmax, so the
other rows are bitwise what they would be without it.

**Plug-in kernels.** An automatically chosen kernel that raises, or returns anything but integer
``[B]`` ids on the device (``KernelOutputError``), has its backend (its ``KernelSpec.backend``)
marked unhealthy; the next candidate draws the same batch. Ids outside ``[0, V)`` cannot be seen
without a host sync: such a row is flagged ``BAD_KERNEL_OUTPUT`` on the device (token 0), and
:meth:`Sampler.redraw` (the runner calls it once the step is on the host) blames the kernel and
samples the step again. A locked (forced) kernel's failure propagates / fails its rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.sampling_api import (
    SamplingKernel,
    TorchSamplingKernel,
    draw_unfiltered,
)
from layerzero_serve.kernels.spec import KernelContext
from layerzero_serve.sampling import _slot_ops as slot_ops
from layerzero_serve.sampling import _state as st
from layerzero_serve.sampling import _validate as v
from layerzero_serve.sampling._batch import (
    P_FLAGS,
    P_OFFSET,
    P_SEED,
    P_SLOT,
    P_TOP_K,
    PackedStaging,
    SamplingBatch,
    SamplingPlan,
)
from layerzero_serve.sampling._kernel_set import SamplingKernels
from layerzero_serve.sampling._kernels import (
    BAD_KERNEL_DETAIL,
    BAD_KERNEL_OUTPUT,
    KernelOutputError,
    check_kernel,
    check_tokens,
)
from layerzero_serve.sampling._outputs import DeviceSample, HostSample, pack
from layerzero_serve.sampling._params import SamplingParams
from layerzero_serve.sampling._processors import (
    greedy_and_flags,
    process_logits,
    row_argmax,
    row_max_and_flags,
)
from layerzero_serve.sampling._rows import admit_row, assign_slot, call_rows, top_up_counts
from layerzero_serve.sampling._validate import INT64_MAX, INT64_MIN, as_int
from layerzero_serve.selection import Selector

logger = logging.getLogger("layerzero_serve")
_EMPTY = np.empty(0, np.int64)
MAX_ROWS = 2**31 - 1  # bound of max_num_seqs / max_rows (int32 row indices)
MAX_VOCAB = 2**31 - 1  # bound of vocab_size (int32 token ids)


class Sampler:
    """Samples one token per row from float logits ``[B, V]``.

    Args:
        seed: seeds the generator that gives unseeded requests their seeds (None: from the OS).
        max_num_seqs: rows per step (the capacity of the persistent buffers and slot tables),
            an int in [1, 2**31 - 1].
        kernel: force a sampling kernel (default: the selection engine's choice at ``bind``,
            or the torch kernel), locked (its failures propagate): a ``SamplingKernel`` (str
            ``name``, bool ``position_invariant``, callable ``sample``), else ValidationError.

    CUDA graphs: ``bind``, ``prepare``, ``seeds_of`` and ``release`` are host work outside capture;
    ``sample`` is graph-safe (no host sync; its work depends only on the batch's plan and shapes),
    so the runner captures it per bucket.
    """

    def __init__(
        self,
        seed: int | None = None,
        *,
        max_num_seqs: int = 256,
        kernel: SamplingKernel | None = None,
    ) -> None:
        if seed is not None:
            allowed = f"None or int in [{INT64_MIN}, {INT64_MAX}]"
            seed = as_int("seed", seed, allowed)
            if not INT64_MIN <= seed <= INT64_MAX:
                raise ValidationError("seed", seed, allowed)
        self.seed = seed
        self._rng = np.random.default_rng(None if seed is None else seed % 2**64)
        self.max_rows = v.int_in("max_num_seqs", max_num_seqs, 1, MAX_ROWS)
        if kernel is not None:
            check_kernel(kernel, "kernel")
        self.kernels = SamplingKernels(kernel)
        self._drawn_by: SamplingKernel | None = None  # the kernel of the last draw (host)
        self.device: torch.device | None = None
        self.vocab_size = 0
        self._step = 0
        self._states: dict[object, st.RowState] = {}
        self._slot_owner: dict[int, st.RowState] = {}

    # ---- set-up ----------------------------------------------------------------------------

    def bind(
        self,
        device: torch.device | str,
        vocab_size: int,
        max_rows: int | None = None,
        selector: Selector | None = None,
        ctx: KernelContext | None = None,
    ) -> Sampler:
        """Allocate the buffers for ``device`` and a vocabulary of ``vocab_size``, and pick the
        kernels (through ``selector.select(Op.SAMPLING, ctx)`` when both are given). Forgets
        every request's state. Called once (the model runner's constructor).

        Raises ``ValidationError`` naming ``device`` (not a device, or a CUDA device that does
        not exist), ``vocab_size`` (int in [1, 2**31 - 1]) or ``max_rows`` (None = the
        constructor's ``max_num_seqs``, else an int in [1, 2**31 - 1])."""
        device = _as_device(device)
        vocab = v.int_in("vocab_size", vocab_size, 1, MAX_VOCAB)
        rows = self.max_rows if max_rows is None else v.int_in("max_rows", max_rows, 1, MAX_ROWS)
        self.device, self.vocab_size, self.max_rows = device, vocab, rows
        self._staging = PackedStaging(self.max_rows, device)
        self.tables = st.DeviceTables(self.max_rows, self.vocab_size, device)
        self._host = st.HostTable()
        self._states.clear()
        self._slot_owner.clear()
        if selector is not None and ctx is not None:
            self.kernels.select(selector, ctx)
        return self

    @property
    def kernel_name(self) -> str:
        return self.kernels.kernel.name

    @property
    def kernel_epoch(self) -> int:
        """Bumped when a failing kernel is replaced (graphs captured before are stale)."""
        return self.kernels.epoch

    def kernel_candidates(self, plan: SamplingPlan) -> list[SamplingKernel]:
        """The kernels that may draw ``plan`` (see ``SamplingKernels.candidates``)."""
        return self.kernels.candidates(plan)

    def _ensure_bound(self, device: torch.device, vocab: int) -> None:
        if self.device is None or self.device != device or self.vocab_size != vocab:
            self.bind(device, vocab)

    # ---- per step (host) -------------------------------------------------------------------

    def prepare(
        self,
        requests: Sequence,
        plan_floor: SamplingPlan | None = None,
        pad_to: int | None = None,
        ahead: int = 0,
    ) -> SamplingBatch:
        """The device inputs of one step for ``requests`` (``types.Request`` or any object with
        its sampling attributes), in row order. One host-to-device copy; not graph-captured.

        For a captured graph: ``plan_floor`` makes the batch run at least that plan (the one
        the graph was captured with); ``pad_to`` (>= len(requests)) adds neutral greedy rows up
        to the graph's bucket size (their outputs are meaningless; read the first rows only).
        ``ahead``: tokens each request will have gained before this step samples (async
        scheduling prepares a step while the previous one's token is still on the device).
        """
        if self.device is None:
            raise ValidationError("sampler", "unbound", "call bind(device, vocab_size) first")
        self._step += 1
        b = len(requests)
        rows = b if pad_to is None else pad_to
        if rows < b:
            raise ValidationError("pad_to", pad_to, f"None or >= the number of requests ({b})")
        get = self._states.get
        states = [get(r.request_id) or self._admit(r) for r in requests]
        idx = np.fromiter((s.hidx for s in states), np.intp, b)
        host = self._host
        static_flags = host.i64[st.I_FLAGS, idx]
        tail, where = _EMPTY, {}
        if b and int(np.bitwise_or.reduce(static_flags)) & st.SLOT_FEATURES:
            tail, where = self._slot_work(requests, states, static_flags).pack()
        if rows > self._staging.rows:  # eager use beyond the capacity (never in graph mode)
            self._staging = PackedStaging(max(rows, 2 * self._staging.rows), self.device)
        stg = self._staging
        stg.begin(len(tail))
        stg.h_f32[:, :b] = host.f32[:, idx]
        cols = host.i64[:, idx]
        lens = np.fromiter((len(r.all_token_ids) for r in requests), np.int64, b)
        num_out = lens + ahead - cols[st.I_PROMPT_LEN]
        active = np.where(num_out < cols[st.I_MIN_TOKENS], st.ACTIVE_MIN_TOKENS, 0)
        hi = stg.h_i64
        hi[P_TOP_K, :b], hi[P_SEED, :b] = cols[st.I_TOP_K], cols[st.I_SEED]
        hi[P_OFFSET, :b], hi[P_SLOT, :b] = num_out, cols[st.I_SLOT]
        hi[P_FLAGS, :b] = cols[st.I_FLAGS] | active
        num_lp = cols[st.I_NUM_LOGPROBS]
        if rows > b:
            self._pad(b, rows)
            num_lp = np.concatenate([num_lp, np.full(rows - b, -1, np.int64)])
        stg.h_tail[: len(tail)] = tail
        dev_tail = stg.upload(len(tail))
        if where:
            slot_ops.apply(self.tables, dev_tail, where)
        plan = SamplingPlan.from_flags(hi[P_FLAGS, :rows], num_lp)
        if plan_floor is not None:
            plan = plan.union(plan_floor)
            self.tables.ensure(
                st.PENALTIES * plan.penalties
                | st.TOKEN_MASK * plan.token_mask
                | st.MIN_TOKENS * plan.min_tokens
            )
        return stg.batch(rows, plan, num_lp)

    def _pad(self, start: int, stop: int) -> None:
        """Neutral greedy rows (no filters, no penalties, neutral slot 0) in ``[start, stop)``."""
        f, i = self._staging.h_f32, self._staging.h_i64
        f[:, start:stop] = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], np.float32)[:, None]
        i[:, start:stop] = 0
        i[P_TOP_K, start:stop] = self.vocab_size
        i[P_FLAGS, start:stop] = st.GREEDY

    def seeds_of(self, requests: Sequence) -> np.ndarray:
        """int64 ``[B]``: the seed each request draws with (its own, its params', or the one
        the sampler gave it at admission), admitting unseen requests. Host work. Speculative
        verification draws from the same ``(seed, offset)`` stream, so a seeded request gets
        the same tokens with or without speculation."""
        get = self._states.get
        states = [get(r.request_id) or self._admit(r) for r in requests]
        idx = np.fromiter((s.hidx for s in states), np.intp, len(states))
        return self._host.i64[st.I_SEED, idx].astype(np.int64)

    def _admit(self, req) -> st.RowState:
        state = admit_row(req, self._host, self.vocab_size, self._rng)
        self._states[req.request_id] = state
        return state

    def _slot_work(self, requests, states, static_flags) -> slot_ops.SlotOps:
        ops = slot_ops.SlotOps()
        for i in np.flatnonzero(static_flags & st.SLOT_FEATURES).tolist():
            s, r = states[i], requests[i]
            s.last_step = self._step
            num_out = len(r.all_token_ids) - len(r.prompt_token_ids)
            if s.slot == 0 or num_out < s.counted:
                if s.slot == 0:
                    self._give_slot(s)
                assign_slot(s, r, ops, self.tables, num_out)
            elif s.flags & st.PENALTIES and num_out > s.counted:
                top_up_counts(s, r, ops, num_out)
        return ops

    def _give_slot(self, s: st.RowState) -> None:
        slot = self.tables.take()
        if slot is None:  # evict the least recently used slot not in this batch
            idle = [o for o in self._slot_owner.values() if o.last_step < self._step]
            if idle:
                victim = min(idle, key=lambda o: o.last_step)
                slot, victim.slot, victim.counted = victim.slot, 0, 0
                self._host.i64[st.I_SLOT, victim.hidx] = 0
            else:
                self.tables.grow(2 * self.tables.num_slots)
                slot = self.tables.take()
        s.slot = slot
        self._slot_owner[slot] = s
        self._host.i64[st.I_SLOT, s.hidx] = slot

    def release(self, request_id) -> None:
        """Forget a finished request (its seed, its table slot). Unknown ids are a no-op."""
        s = self._states.pop(request_id, None)
        if s is None:
            return
        self._host.remove(s.hidx)
        if s.slot:
            self._slot_owner.pop(s.slot, None)
            self.tables.give(s.slot)

    # ---- one-shot convenience ---------------------------------------------------------------

    def __call__(
        self,
        logits: torch.Tensor,
        params: SamplingParams | Sequence[SamplingParams],
        *,
        seeds: Sequence[int | None] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        output_token_ids: Sequence[Sequence[int]] | None = None,
        eos_token_id: int | None = None,
    ) -> HostSample:
        """prepare + sample + to_host for rows that live one call (tests, tools).

        ``logits`` float ``[B, V]``; ``params`` one SamplingParams or B; ``seeds`` per row
        (None: the sampler's generator); the prompt / output token ids per row feed penalties,
        min-tokens and the row's offset (its output length).

        Every input is validated here (this is not the engine's per-step path, which calls
        ``prepare`` / ``sample``): ``ValidationError`` names ``params`` (not a SamplingParams
        or a sequence of them), ``prompt_token_ids`` / ``output_token_ids`` / ``eos_token_id``
        (an id outside ``[0, V)``), or the params field ``validate_for_vocab(V)`` rejects
        (ids outside the vocabulary, ``logprobs`` > V, ...)."""
        if params is None or not (
            isinstance(params, SamplingParams)
            or (isinstance(params, Iterable) and not isinstance(params, (str, bytes, dict)))
        ):
            raise ValidationError("params", params, "a SamplingParams or one per row")
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[1] >= 1:
            vocab = int(logits.shape[1])
            if eos_token_id is not None:
                eos_token_id = v.token_id("eos_token_id", eos_token_id, vocab)
            prompt_token_ids = _rows_of_ids("prompt_token_ids", prompt_token_ids, vocab)
            output_token_ids = _rows_of_ids("output_token_ids", output_token_ids, vocab)
        rows = call_rows(logits, params, seeds, prompt_token_ids, output_token_ids, eos_token_id)
        checked: set[int] = set()
        # once per distinct params object; EOS is not passed, so allowed_token_ids == [EOS]
        # with min_tokens > 0 still reaches the row's run-time failure flag (ALL_MASKED)
        for r in rows:
            if id(r.sampling_params) not in checked:
                checked.add(id(r.sampling_params))
                r.sampling_params.validate_for_vocab(logits.shape[1])
        self._ensure_bound(logits.device, logits.shape[1])
        try:
            return self.redraw(logits, self.sample(logits, self.prepare(rows)).to_host(), rows)
        finally:
            for r in rows:
                self.release(r.request_id)

    # ---- per step (device) -----------------------------------------------------------------

    def sample(
        self, logits: torch.Tensor, batch: SamplingBatch, kernel: SamplingKernel | None = None
    ) -> DeviceSample:
        """Sample one token per row of ``logits`` (float ``[>= B, V]`` on the bound device; the
        first ``batch.num_rows`` rows are used). Graph-safe: no host synchronisation; the work
        depends only on ``batch.plan`` and shapes. ``kernel``: draw with this one of
        :meth:`kernel_candidates` instead of the plan's default (the sampler graphs measure
        them per bucket and plan); if it raises, the default takes over as usual."""
        plan = batch.plan
        self._drawn_by = None
        raw = logits[: batch.num_rows]
        if raw.dtype != torch.float32:
            raw = raw.float()
        x = process_logits(raw, batch, self.tables)
        probs = None
        if plan.all_greedy:  # argmax fast path: no softmax, no separate max reduction
            tokens, flags = greedy_and_flags(x)
        else:
            row_max, flags = row_max_and_flags(x)
            greedy_tokens = row_argmax(x) if plan.any_greedy else None
            first = kernel or self.kernels.for_plan(plan)
            from_logits = getattr(first, "takes_logits", False) is True
            tokens = self._draw_from_logits(x, batch, kernel) if from_logits else None
            if tokens is None or plan.processed_logprobs:  # probabilities needed
                bad = (flags != 0).unsqueeze(-1)
                z = (x - row_max.unsqueeze(-1)) / batch.temperature.unsqueeze(-1)
                probs = torch.softmax(torch.where(bad, 0.0, z), dim=-1)
            if tokens is None:  # (a from-logits ``kernel`` that failed is not tried again)
                tokens = self._draw(probs, batch, None if from_logits else kernel)
            if plan.any_greedy:
                tokens = torch.where((batch.flags & st.GREEDY) != 0, greedy_tokens, tokens)
            if type(self._drawn_by) is not TorchSamplingKernel:  # a plug-in's ids
                bad = (tokens < 0) | (tokens >= x.shape[-1])
                flags = torch.where(bad & (flags == 0), BAD_KERNEL_OUTPUT, flags)
        tokens = torch.where(flags != 0, 0, tokens)
        batch.offset.add_(1)  # fresh numbers if a graph replays without a new prepare()
        packed = pack(tokens, flags, raw, x, probs, batch)
        return DeviceSample(tokens, flags, packed, batch.num_logprobs, self._drawn_by)

    def redraw(self, logits: torch.Tensor, result: HostSample, requests: Sequence) -> HostSample:
        """Host: when ``blame_bad_output`` replaced the kernel, the step sampled again from the
        same ``logits`` (float ``[>= B, V]``; ``prepare`` gives the same seeds and offsets);
        else ``result`` itself (a locked kernel's bad rows stay failed). Not graph-captured."""
        if not self.blame_bad_output(result, requests):
            return result
        return self.sample(logits, self.prepare(requests)).to_host()

    def blame_bad_output(self, result: HostSample, requests: Sequence) -> bool:
        """When rows of ``result`` (the step of ``requests``) got ids outside the vocabulary,
        mark the drawing kernel's backend unhealthy and choose again; True when replaced. Host
        only; stages nothing (safe while a later step is in flight, async scheduling)."""
        if BAD_KERNEL_DETAIL not in result.failed.values():
            return False
        get = self._states.get
        seeded = any((s := get(r.request_id)) and s.flags & st.SEEDED for r in requests)
        ks = self.kernels
        kernel = result.drawn_by or (ks.invariant if seeded else ks.kernel)
        error = KernelOutputError(f"sampling kernel {kernel.name} returned ids outside [0, V)")
        try:
            ks.fall_back(kernel, error)
        except KernelOutputError:
            return False
        return True

    def _draw_from_logits(
        self, x: torch.Tensor, batch: SamplingBatch, kernel: SamplingKernel | None
    ) -> torch.Tensor | None:
        """Tokens from a kernel that samples ``softmax(x / T)`` itself (no probabilities
        materialised); None when that kernel failed and the replacement takes probabilities.
        Greedy rows ask for top-k 1, the kernels' cheapest case (their token is the argmax)."""
        b = batch
        top_k = b.top_k.to(torch.int32)
        if b.plan.any_greedy:
            top_k = torch.where((b.flags & st.GREEDY) != 0, 1, top_k)

        def call(k: SamplingKernel) -> torch.Tensor | None:
            if getattr(k, "takes_logits", False) is not True:
                return None
            kw = {"hints": b.plan.hints()} if getattr(k, "takes_hints", False) is True else {}
            out = k.sample_logits(x, b.temperature, top_k, b.top_p, b.min_p, b.seed, b.offset, **kw)
            return check_tokens(k, out, x.shape[0], x.device)

        return self._with_fallback(b.plan, call, kernel)

    def _draw(
        self, probs: torch.Tensor, batch: SamplingBatch, kernel: SamplingKernel | None
    ) -> torch.Tensor:
        b = batch
        top_k = b.top_k.to(torch.int32)

        def call(k: SamplingKernel) -> torch.Tensor:
            if not b.plan.filters and type(k) is TorchSamplingKernel:
                return draw_unfiltered(probs, b.min_p, b.seed, b.offset)
            out = k.sample(probs, top_k, b.top_p, b.min_p, b.seed, b.offset)
            return check_tokens(k, out, probs.shape[0], probs.device)

        return self._with_fallback(b.plan, call, kernel)

    def _with_fallback(self, plan: SamplingPlan, call, first: SamplingKernel | None = None):
        """``call(kernel)`` through ``SamplingKernels.with_fallback``; remembers which kernel
        drew (``DeviceSample.drawn_by``)."""
        out, self._drawn_by = self.kernels.with_fallback(plan, call, first)
        return out


def _as_device(device: object) -> torch.device:
    allowed = "a torch.device or a device string such as 'cpu' or 'cuda:0'"
    if not isinstance(device, (torch.device, str)):
        raise ValidationError("device", device, allowed)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValidationError("device", device, allowed, str(e).splitlines()[0]) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            ok = f"a CUDA device index in [0, {count})" if count else "'cpu' (no CUDA device)"
            raise ValidationError("device", device, ok)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _rows_of_ids(param: str, seqs: object, vocab: int) -> list[list[int]] | None:
    """None, or one iterable of token ids in ``[0, vocab)`` per row, as lists."""
    if seqs is None:
        return None
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Iterable):
        raise ValidationError(param, seqs, "None or one list of token ids per row")
    return [v.token_ids_in_vocab(f"{param}[{i}]", ids, vocab) for i, ids in enumerate(seqs)]
