"""Reference (PyTorch) token sampler.

Processing of one sampled row, in this order:

1. **temperature**: logits are divided by ``temperature`` (after subtracting the row max, which
   leaves the distribution unchanged and keeps tiny temperatures from overflowing);
2. **top-k**: keep the ``k`` most likely tokens (``k = vocab`` when top-k is off or larger than
   the vocabulary);
3. **top-p**: on the distribution renormalised over the kept tokens, keep the smallest prefix of
   the sorted tokens whose probability sums to at least ``top_p`` (token ``j`` is kept iff the
   mass of the tokens strictly before it is ``< top_p``; the most likely token is always kept;
   ``top_p == 1`` keeps everything);
4. **min-p**: keep tokens whose probability is ``>= min_p * p_max``, ``p_max`` being the largest
   probability after steps 1-3 (the ratio does not depend on renormalisation);
5. renormalise over the kept tokens and draw one token.

Greedy rows (``temperature == 0`` or ``top_k == 1``) take the argmax of the *raw* logits; ties
go to the lowest token id. Greedy rows draw no random numbers.

**Tie rule.** Tokens are ranked by a stable sort of the raw logits in descending order, so among
equal logits the lower token id ranks first. Every boundary (top-k cut, top-p cut) is a cut in
this ranking: of several tokens tied at the boundary the lower ids are kept. (min-p compares
probabilities, so tied tokens are kept or dropped together.)

**Randomness.** Each sampled row draws exactly one uniform number in [0, 1) and inverts the CDF
of its filtered distribution (in ranked order). A row whose generator is given draws it with
``torch.rand(1, generator=g)`` from that generator alone, so a seeded request produces the same
tokens whatever its batch position and batch companions. Rows whose generator is ``None`` share
the sampler's own generator (one batched draw for all of them, in row order).

This is the reference implementation: it builds per-row parameter tensors on the host, loops
over seeded rows in Python and uses data-dependent indexing, so it synchronises with the host
and is **not CUDA-graph safe**. A graph-safe sampler comes later; this one defines the semantics
it must match. Logits containing NaN yield an unspecified (but in-range) token: detecting
non-finite logits is the caller's job.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.sampling.params import INT64_MAX, INT64_MIN, SamplingParams


class Sampler:
    """Samples one token per row from float32 logits ``[S, V]``.

    Args:
        seed: seeds the sampler's own generator (one per device, created lazily), used by the
            rows whose generator is ``None``. ``None`` seeds it non-deterministically.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None:
            allowed = f"None or int in [{INT64_MIN}, {INT64_MAX}]"
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise ValidationError("seed", seed, allowed)
            if not INT64_MIN <= seed <= INT64_MAX:
                raise ValidationError("seed", seed, allowed)
            seed = int(seed)
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    # ---- generators ------------------------------------------------------------------------

    @staticmethod
    def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
        """The generator a seeded request keeps for its lifetime:
        ``torch.Generator(device=device).manual_seed(seed)``."""
        return torch.Generator(device=device).manual_seed(seed)

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The sampler's own generator for ``device`` (created on first use)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    # ---- public API ------------------------------------------------------------------------

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        """Sample one token per row.

        Args:
            logits: ``[S, V]`` floating tensor on any device (float32 expected; other float
                dtypes are upcast to float32).
            params: ``S`` SamplingParams, row ``i`` uses ``params[i]``.
            generators: ``S`` entries, ``torch.Generator`` on ``logits.device`` for a seeded
                request (the caller creates it once per request with
                ``torch.Generator(device=logits.device).manual_seed(seed)`` and keeps it), or
                ``None`` to draw from the sampler's own generator. ``None`` for the whole
                argument = all rows ``None``.

        Returns:
            ``torch.long`` tensor ``[S]`` on ``logits.device``: the sampled token ids.
        """
        logits, params, generators = self._check(logits, params, generators)
        num_rows = logits.shape[0]
        device = logits.device
        tokens = torch.empty(num_rows, dtype=torch.long, device=device)
        if num_rows == 0:
            return tokens

        greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]

        if greedy_rows:
            if not sampled_rows:
                return torch.argmax(logits, dim=-1)
            g_idx = torch.tensor(greedy_rows, dtype=torch.long, device=device)
            tokens[g_idx] = torch.argmax(logits[g_idx], dim=-1)
        if not sampled_rows:
            return tokens

        if greedy_rows:
            s_idx = torch.tensor(sampled_rows, dtype=torch.long, device=device)
            s_logits = logits[s_idx]
        else:
            s_idx = None
            s_logits = logits
        s_params = [params[i] for i in sampled_rows]

        order, weights, num_kept = self._filter(s_logits, s_params)
        u = self._uniforms([generators[i] for i in sampled_rows], device)

        # Inverse CDF in ranked order: the first position whose cumulative weight exceeds
        # u * total. The kept tokens form a prefix of the ranking; clamping to the last kept
        # position guards against u * total rounding up to the total.
        cdf = torch.cumsum(weights, dim=-1)
        target = (u * cdf[:, -1]).unsqueeze(-1)
        pos = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        pos = torch.minimum(pos, num_kept - 1)
        s_tokens = torch.gather(order, 1, pos.unsqueeze(-1)).squeeze(-1)

        if s_idx is None:
            return s_tokens
        tokens[s_idx] = s_tokens
        return tokens

    def compute_probs(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """The distribution each row is sampled from.

        Args:
            logits: ``[S, V]`` floating tensor (upcast to float32).
            params: ``S`` SamplingParams.

        Returns:
            float32 ``[S, V]`` on ``logits.device``: the processed and renormalised distribution
            (temperature -> top-k -> top-p -> min-p) in token-id order; greedy rows are one-hot
            at the argmax of the raw logits (lowest id on ties).
        """
        logits, params, _ = self._check(logits, params, None)
        num_rows, vocab = logits.shape
        device = logits.device
        probs = torch.zeros(num_rows, vocab, dtype=torch.float32, device=device)
        if num_rows == 0:
            return probs
        greedy_rows = [i for i, p in enumerate(params) if p.is_greedy]
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if greedy_rows:
            g_idx = torch.tensor(greedy_rows, dtype=torch.long, device=device)
            best = torch.argmax(logits[g_idx], dim=-1, keepdim=True)
            probs[g_idx] = torch.zeros_like(probs[g_idx]).scatter_(1, best, 1.0)
        if sampled_rows:
            s_idx = torch.tensor(sampled_rows, dtype=torch.long, device=device)
            order, weights, _ = self._filter(logits[s_idx], [params[i] for i in sampled_rows])
            weights = weights / weights.sum(dim=-1, keepdim=True)
            probs[s_idx] = torch.zeros_like(weights).scatter_(1, order, weights)
        return probs

    # ---- internals -------------------------------------------------------------------------

    @staticmethod
    def _check(logits, params, generators):
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValidationError("logits", shape, "a 2-D tensor [S, V]")
        if not logits.is_floating_point():
            raise ValidationError("logits", logits.dtype, "a floating-point tensor (float32)")
        num_rows, vocab = logits.shape
        if vocab < 1:
            raise ValidationError("logits", tuple(logits.shape), "V >= 1")
        if logits.dtype != torch.float32:
            logits = logits.float()
        params = list(params)
        if len(params) != num_rows:
            raise ValidationError("params", len(params), f"exactly {num_rows} (one per row)")
        for i, p in enumerate(params):
            if not isinstance(p, SamplingParams):
                raise ValidationError(f"params[{i}]", p, "a SamplingParams")
        if generators is None:
            generators = [None] * num_rows
        else:
            generators = list(generators)
            if len(generators) != num_rows:
                raise ValidationError(
                    "generators", len(generators), f"exactly {num_rows} (one per row)"
                )
            for i, g in enumerate(generators):
                if g is None:
                    continue
                if not isinstance(g, torch.Generator):
                    raise ValidationError(f"generators[{i}]", g, "torch.Generator or None")
                if g.device.type != logits.device.type:
                    raise ValidationError(
                        f"generators[{i}]",
                        g.device,
                        f"a generator on {logits.device} (the logits' device)",
                    )
        return logits, params, generators

    @staticmethod
    def _filter(
        logits: torch.Tensor, params: Sequence[SamplingParams]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Apply temperature, top-k, top-p and min-p to non-greedy rows, vectorised.

        Args:
            logits: float32 ``[R, V]``.
            params: ``R`` non-greedy SamplingParams.

        Returns:
            ``order``: long ``[R, V]``, token ids ranked by descending logit (stable: lower id
            first among equal logits);
            ``weights``: float32 ``[R, V]``, unnormalised probabilities in ranked order, zero
            outside the kept set (a prefix of the ranking, never empty);
            ``num_kept``: long ``[R]``, the size of that prefix.
        """
        num_rows, vocab = logits.shape
        device = logits.device
        temperature = torch.tensor(
            [p.temperature for p in params], dtype=torch.float32, device=device
        )
        top_k = torch.tensor(
            [vocab if p.top_k <= 0 else min(p.top_k, vocab) for p in params],
            dtype=torch.long,
            device=device,
        )
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)

        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        scaled = (sorted_logits - sorted_logits[:, :1]) / temperature.unsqueeze(-1)
        probs = torch.softmax(scaled, dim=-1)  # non-increasing along the ranking

        rank = torch.arange(vocab, device=device)
        keep = rank.unsqueeze(0) < top_k.unsqueeze(-1)

        # top-p on the distribution renormalised after top-k: keep j iff mass before j < top_p.
        masked = probs * keep
        masked = masked / masked.sum(dim=-1, keepdim=True)
        cum = torch.cumsum(masked, dim=-1)
        mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)
        keep &= (mass_before < top_p.unsqueeze(-1)) | (top_p.unsqueeze(-1) >= 1.0)

        # min-p relative to the most likely token, which is always kept (rank 0).
        keep &= probs >= min_p.unsqueeze(-1) * probs[:, :1]
        keep &= probs > 0  # underflowed tokens can never be drawn

        weights = probs * keep
        # >= 1 even for a NaN row (whose token is then unspecified but in range).
        num_kept = keep.sum(dim=-1).clamp_(min=1)
        return order, weights, num_kept

    def _uniforms(self, generators: list[torch.Generator | None], device: torch.device):
        """One float32 uniform in [0, 1) per row: seeded rows from their own generator only,
        the others from one batched draw of the sampler's generator."""
        num_rows = len(generators)
        own_rows = [i for i, g in enumerate(generators) if g is None]
        if len(own_rows) == num_rows:
            return torch.rand(num_rows, generator=self.generator(device), device=device)
        u = torch.empty(num_rows, dtype=torch.float32, device=device)
        seeded_rows = [i for i, g in enumerate(generators) if g is not None]
        draws = [torch.rand(1, generator=generators[i], device=device) for i in seeded_rows]
        u[torch.tensor(seeded_rows, dtype=torch.long, device=device)] = torch.cat(draws)
        if own_rows:
            own = torch.rand(len(own_rows), generator=self.generator(device), device=device)
            u[torch.tensor(own_rows, dtype=torch.long, device=device)] = own
        return u
