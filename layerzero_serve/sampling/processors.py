"""Logits processing on the device, row-wise and without host synchronisation (graph-safe).

Order (vLLM's): token mask (logit bias, allowed ids, bad ids: one additive row per request),
min-tokens (EOS and stop ids to ``-inf`` while the output is shorter than ``min_tokens``), then
penalties: repetition (tokens seen in prompt or output: positive logits divided by the penalty,
negative ones multiplied), frequency (minus penalty x count in the output) and presence (minus
penalty if in the output). ``-inf`` stays ``-inf`` through every step.

Every operation is element-wise or a per-row reduction, so a row's result never depends on the
other rows of the batch (bitwise).
"""

from __future__ import annotations

import torch

from layerzero_serve.sampling.batch import SamplingBatch
from layerzero_serve.sampling.state import ACTIVE_MIN_TOKENS, DeviceTables

NON_FINITE = 1  # NaN or +inf in the row
ALL_MASKED = 2  # every logit is -inf
FAILURE_DETAILS = {
    NON_FINITE: "sampling failed: the model's logits contain NaN or +inf",
    ALL_MASKED: "sampling failed: every token's logit is -inf (after bias, masks and penalties)",
}


def apply_penalties(
    x: torch.Tensor,
    counts: torch.Tensor,
    prompt_mask: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """``x`` float32 ``[B, V]``; ``counts`` int32 ``[B, V]`` output-token counts;
    ``prompt_mask`` bool ``[B, V]``; penalties float32 ``[B]`` (1 / 0 / 0 = identity).
    Returns a new float32 ``[B, V]``."""
    in_output = counts > 0
    seen = in_output | prompt_mask
    r = repetition.unsqueeze(-1)
    x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    x = x - frequency.unsqueeze(-1) * counts.to(torch.float32)
    return x - presence.unsqueeze(-1) * in_output.to(torch.float32)


def process_logits(x: torch.Tensor, batch: SamplingBatch, tables: DeviceTables) -> torch.Tensor:
    """float32 ``[B, V]`` model logits -> processed logits (a new tensor when any stage runs;
    ``x`` itself otherwise). Stages run when the batch's plan asks for them; rows that do not
    use a stage read the neutral table row 0, which leaves them unchanged."""
    plan = batch.plan
    if plan.token_mask:
        x = x + tables.bias[batch.slot]
    if plan.min_tokens:
        active = (batch.flags & ACTIVE_MIN_TOKENS) != 0
        x = x.masked_fill(tables.stop[batch.slot] & active.unsqueeze(-1), float("-inf"))
    if plan.penalties:
        slot = batch.slot
        x = apply_penalties(
            x,
            tables.counts[slot],
            tables.prompt[slot],
            batch.repetition,
            batch.presence,
            batch.frequency,
        )
    return x


def row_max_and_flags(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One reduction gives both the row max (for a stable softmax) and the failure flag:
    ``amax`` propagates NaN, is ``+inf`` with an infinite logit and ``-inf`` when every logit
    is. Returns (float32 ``[B]``, int64 ``[B]`` of 0 / NON_FINITE / ALL_MASKED)."""
    m = x.amax(dim=-1)
    bad = torch.isnan(m) | (m == float("inf"))
    flags = torch.where(bad, NON_FINITE, torch.where(m == float("-inf"), ALL_MASKED, 0))
    return m, flags
