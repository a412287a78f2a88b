"""Verification of one step's drafts inside the engine: target logits of every scheduled
position -> processed target distributions -> lossless acceptance -> tokens per request.

A request with ``d`` drafts is scheduled with ``1 + d`` query tokens (its last token, then the
drafts); the target's logits at those positions give ``p_0 .. p_d``. The distributions are
processed exactly as the sampler processes a non-speculative step of the same request
(temperature, then top-k -> top-p -> min-p, see ``kernels.sampling_api.filter_weights``), so
the emitted tokens follow the non-speculative law; greedy requests accept the longest prefix
matching the argmax. Only requests whose sampling needs no per-token state take part
(:func:`can_speculate`): penalties, bias, masks, min-tokens and logprobs are per-token
processors whose state would have to advance inside the draft window.

Randomness is counter-based (``counter_uniform`` of the request's seed and its output length),
so a seeded request gets the same tokens at any batch position. Drafts from a deterministic
proposer (n-gram) have a one-hot ``q``.
"""

from __future__ import annotations

import numpy as np
import torch

from layerzero_serve.kernels.sampling_api import counter_uniform, filter_weights
from layerzero_serve.sampling.params import SamplingParams
from layerzero_serve.spec_decode.rejection import greedy_verify

# Separates verification's random streams from the sampler's (same seed, different counters).
_STREAM = 0x5EC0DE00000000


def can_speculate(params: SamplingParams | None) -> bool:
    """Whether a request's sampling is stateless per token (see the module docstring)."""
    if params is None:
        return True
    return (
        params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and not params.logit_bias
        and params.allowed_token_ids is None
        and not params.bad_token_ids
        and params.min_tokens == 0
        and params.logprobs is None
    )


class SpecVerifier:
    """Verifies drafts with the ``Op.REJECTION_SAMPLING`` kernel chosen once at start-up.

    Args:
        kernel: callable ``(draft_ids, draft_probs, target_probs, uniforms, noise, num_drafts,
            is_greedy) -> (output_ids, num_accepted)`` (``spec_decode.rejection`` contract).
        seed: engine seed; unseeded requests get ``hash(seed, request id)`` as their stream.
    """

    def __init__(self, kernel, seed: int = 0) -> None:
        self.kernel = kernel
        self.seed = seed

    def _row_seed(self, request) -> int:
        p = request.sampling_params
        if p is not None and p.seed is not None:
            return p.seed
        h = hash((self.seed, request.request_id, "spec")) & ((1 << 62) - 1)
        return h

    def verify(
        self, logits: torch.Tensor, requests: list, drafts: list[list[int]]
    ) -> list[list[int]]:
        """Tokens emitted for each request (accepted drafts, then one target token).

        Args:
            logits: float32 ``[sum(1 + d_i), V]``, each request's ``1 + d_i`` positions in order.
            requests: the ``B`` requests (their ``sampling_params`` and output lengths).
            drafts: ``B`` lists of draft ids (``d_i`` each, ``d_i >= 1``).

        Returns: ``B`` lists of ``a_i + 1`` token ids. One device-to-host copy.
        """
        b = len(requests)
        vocab = logits.shape[-1]
        dev = logits.device
        lens = np.fromiter((len(d) for d in drafts), dtype=np.int64, count=b)
        k = int(lens.max())
        # [B, k+1] gather of each row's positions (pads repeat the row's last position).
        starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
        pos = np.minimum(np.arange(k + 1)[None, :], lens[:, None]) + starts[:, None]
        draft_ids = np.full((b, k), -1, dtype=np.int64)
        for i, d in enumerate(drafts):
            draft_ids[i, : len(d)] = d
        params = [r.sampling_params or SamplingParams() for r in requests]
        greedy = np.array([p.is_greedy for p in params])
        temp = np.array([1.0 if p.is_greedy else p.temperature for p in params], np.float32)
        top_k = np.array([vocab if p.top_k <= 0 else min(p.top_k, vocab) for p in params], np.int32)
        top_p = np.array([p.top_p for p in params], np.float32)
        min_p = np.array([p.min_p for p in params], np.float32)
        seeds = np.array([self._row_seed(r) for r in requests], np.int64)
        offsets = np.array([r.num_output_tokens for r in requests], np.int64)

        # Two host-to-device copies: every int64 input in one buffer, every float32 in another.
        ints = (pos, draft_ids, greedy, top_k, seeds, offsets, lens)
        flat = torch.from_numpy(np.concatenate([np.ravel(a).astype(np.int64) for a in ints]))
        flat = flat.to(dev, non_blocking=True)
        floats = torch.from_numpy(np.concatenate([temp, top_p, min_p])).to(dev, non_blocking=True)
        t, at = {}, 0
        names = ("pos", "draft", "greedy", "top_k", "seed", "offset", "n")
        for name, a in zip(names, ints, strict=True):
            t[name] = flat[at : at + a.size].view(a.shape)
            at += a.size
        t["greedy"] = t["greedy"].bool()
        t["top_k"] = t["top_k"].to(torch.int32)
        t["n"] = t["n"].to(torch.int32)
        t["temp"], t["top_p"], t["min_p"] = floats[:b], floats[b : 2 * b], floats[2 * b :]
        x = logits[t["pos"]].float()  # [B, k+1, V]
        if greedy.all():  # argmax only: no softmax, no sort over the vocabulary
            out, num_acc = greedy_verify(t["draft"], x.argmax(dim=-1), t["n"])
            return self._to_host(out, num_acc)
        x = x - x.amax(dim=-1, keepdim=True)
        probs = torch.softmax(x / t["temp"][:, None, None], dim=-1)
        flat = probs.reshape(b * (k + 1), vocab)
        rep = k + 1
        kept = filter_weights(
            flat,
            t["top_k"].repeat_interleave(rep),
            t["top_p"].repeat_interleave(rep),
            t["min_p"].repeat_interleave(rep),
        )
        target = (kept / kept.sum(dim=-1, keepdim=True)).reshape(b, k + 1, vocab)
        # Greedy rows: one-hot at the argmax of the raw logits (lowest id on ties), exactly the
        # token a non-speculative greedy step takes (a softmax could merge near-equal logits).
        one_hot = torch.zeros_like(target).scatter_(2, x.argmax(dim=-1, keepdim=True), 1.0)
        target = torch.where(t["greedy"][:, None, None], one_hot, target)
        # Random inputs: per row, counters (output length, draft position / token id).
        seed = t["seed"] + _STREAM
        base = t["offset"] * (vocab + k + 1)
        u = counter_uniform(
            seed[:, None].expand(b, k).reshape(-1),
            (base[:, None] + torch.arange(k, device=dev)).reshape(-1),
        ).reshape(b, k)
        e = counter_uniform(
            seed[:, None].expand(b, vocab).reshape(-1),
            (base[:, None] + k + 1 + torch.arange(vocab, device=dev)).reshape(-1),
        ).reshape(b, vocab)
        noise = 1.0 / (-torch.log1p(-e)).clamp_min(1e-30)  # 1 / Exp(1), finite
        out, num_acc = self.kernel(t["draft"], None, target, u, noise, t["n"], t["greedy"].to(dev))
        return self._to_host(out, num_acc)

    @staticmethod
    def _to_host(out: torch.Tensor, num_acc: torch.Tensor) -> list[list[int]]:
        """One device-to-host copy; row i keeps its accepted drafts and the target's token."""
        host = torch.cat([out, num_acc[:, None].to(out.dtype)], dim=1).cpu().numpy()
        return [row[: int(row[-1]) + 1].tolist() for row in host]
