"""Updates of the sampler's device tables for one step, collected on the host, shipped in the
tail of the packed buffer (same host-to-device copy as the parameters) and applied on the device
in ``prepare()`` (outside any graph; ``sample()`` only reads the tables).

Sections, applied in this order: slot resets (zero counts and masks, bias row set to 0 or to
``-inf`` when the request has an allowed list), allowed ids (bias 0), logit bias (added), bad
ids (bias ``-inf``), output-token counts (added), prompt tokens (mask), stop ids (mask).
"""

from __future__ import annotations

import numpy as np
import torch

from layerzero_serve.sampling._state import DeviceTables

SECTIONS = ("reset", "allowed", "bias", "bad", "counts", "prompt", "stop")


class SlotOps:
    """Host-side lists of (slot, token[, value]) updates for one step."""

    __slots__ = ("slots", "tokens", "values", "reset_base")

    def __init__(self) -> None:
        self.slots: dict[str, list[np.ndarray]] = {s: [] for s in SECTIONS}
        self.tokens: dict[str, list[np.ndarray]] = {s: [] for s in SECTIONS}
        self.values: list[np.ndarray] = []  # float32 bias values, as their bits
        self.reset_base: list[int] = []  # 1: the bias row starts at -inf (allowed list)

    def add(self, section: str, slot: int, tokens, values=None) -> None:
        toks = np.asarray(tokens, dtype=np.int64)
        if toks.size == 0:
            return
        self.slots[section].append(np.full(toks.size, slot, np.int64))
        self.tokens[section].append(toks)
        if values is not None:
            bits = np.asarray(values, dtype=np.float32).view(np.int32)
            self.values.append(bits.astype(np.int64))

    def reset(self, slot: int, bias_base_neg_inf: bool) -> None:
        self.slots["reset"].append(np.array([slot], np.int64))
        self.tokens["reset"].append(np.array([slot], np.int64))
        self.reset_base.append(int(bias_base_neg_inf))

    def pack(self) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
        """One int64 array and ``section -> (start, length)``: slots, then tokens, of each
        section (the reset section's tokens are its bias-base flags), then the bias values."""
        parts: list[np.ndarray] = []
        where: dict[str, tuple[int, int]] = {}
        pos = 0
        for s in SECTIONS:
            n = sum(a.size for a in self.slots[s])
            if n == 0:
                continue
            toks = [np.asarray(self.reset_base, np.int64)] if s == "reset" else self.tokens[s]
            parts += self.slots[s] + toks
            where[s] = (pos, n)
            pos += 2 * n
        if self.values:
            n = sum(a.size for a in self.values)
            parts += self.values
            where["values"] = (pos, n)
        if not parts:
            return np.empty(0, np.int64), where
        return np.concatenate(parts), where


def apply(tables: DeviceTables, tail: torch.Tensor, where: dict[str, tuple[int, int]]) -> None:
    """Apply the packed updates ``tail`` (int64, on the tables' device). Not graph-captured."""

    def cols(section):
        start, n = where[section]
        return tail[start : start + n], tail[start + n : start + 2 * n]

    if "reset" in where:
        slots, base = cols("reset")
        for t in (tables.counts, tables.prompt, tables.stop):
            if t is not None:
                t[slots] = 0
        if tables.bias is not None:
            row = torch.where(base == 1, float("-inf"), 0.0).to(torch.float32)
            tables.bias[slots] = row.unsqueeze(-1).expand(-1, tables.vocab)
    if "allowed" in where:
        tables.bias[cols("allowed")] = 0.0
    if "bias" in where:
        start, n = where["values"]
        vals = tail[start : start + n].to(torch.int32).view(torch.float32)
        tables.bias.index_put_(cols("bias"), vals, accumulate=True)
    if "bad" in where:
        tables.bias[cols("bad")] = float("-inf")
    if "counts" in where:
        s, t = cols("counts")
        ones = torch.ones(s.shape, dtype=torch.int32, device=s.device)
        tables.counts.index_put_((s, t), ones, accumulate=True)
    if "prompt" in where:
        tables.prompt[cols("prompt")] = True
    if "stop" in where:
        tables.stop[cols("stop")] = True
