"""Verification of one step's drafts inside the engine: target logits of every scheduled
position -> per-position target tokens -> accepted drafts + one token per request.

A request with ``d`` drafts is scheduled with ``1 + d`` query tokens (its last token, then the
drafts); the target's logits at those positions give ``p_0 .. p_d``. For every position the
verifier draws the token the target itself would emit there: the argmax for greedy requests,
otherwise a draw from ``p_j`` processed exactly as the sampler processes a plain step
(temperature, then top-k -> top-p -> min-p) with the **sampler's own random stream** for that
output index (``counter_uniform(seed, offset + j)``, inverse CDF in token-id order). Drafts are
accepted while they equal those tokens; the first differing token (or the one after the last
draft) is emitted. For deterministic (one-hot) drafts this is exactly lossless rejection
sampling (a draft ``x`` is accepted with probability ``p(x)``; on rejection the token follows
``p`` without ``x``, renormalised), and more: a request's tokens are the ones plain decoding
gives with the same seed, whatever ``k``, its batch mates or the engine's history. Proposers
that draft from a distribution ``q`` go through ``rejection_sample`` (kernels) instead.

Only requests whose sampling needs no per-token state take part (:func:`can_speculate`):
penalties, bias, masks, min-tokens and logprobs would have to advance inside the draft window.
A row whose logits hold NaN / +inf, or are all -inf, fails like a sampled row does.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from layerzero_serve.kernels.sampling_api import draw_inverse_cdf, filter_weights
from layerzero_serve.sampling import FAILURE_DETAILS, SamplingParams, row_max_and_flags
from layerzero_serve.spec_decode._rejection import greedy_verify


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
    """Verifies one step's drafts (see the module docstring).

    Args:
        kernel: the ``Op.REJECTION_SAMPLING`` kernel chosen for the plan (used by proposers
            that give draft distributions; kept for reports).
        seed: engine seed, for requests the sampler has not seen (standalone use).
        seeds_of: ``requests -> int64 [B]`` seeds the sampler draws each request with
            (``Sampler.seeds_of``); None: the request's seed, its params' seed, else a stable
            hash of ``(seed, request id)``.

    CUDA graphs: ``verify`` runs eagerly after the (captured) verification forward: host-side index
    arithmetic, device sampling, one device-to-host copy.
    """

    def __init__(self, kernel, seed: int = 0, seeds_of=None) -> None:
        self.kernel = kernel
        self.seed = seed
        self.seeds_of = seeds_of

    def _seeds(self, requests: list) -> np.ndarray:
        if self.seeds_of is not None:
            return np.asarray(self.seeds_of(requests), dtype=np.int64)
        out = np.empty(len(requests), dtype=np.int64)
        for i, r in enumerate(requests):
            seed = getattr(r, "seed", None)
            if seed is None and r.sampling_params is not None:
                seed = r.sampling_params.seed
            if seed is None:  # stable across processes (str hashes are salted per process)
                key = f"{self.seed}/{r.request_id}".encode()
                seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little", signed=True)
            out[i] = seed
        return out

    def verify(
        self,
        logits: torch.Tensor,
        requests: list,
        drafts: list[list[int]],
        failed: dict[int, str] | None = None,
    ) -> list[list[int]]:
        """Tokens emitted for each request (accepted drafts, then one target token).

        Args:
            logits: float32 ``[sum(1 + d_i), V]``, each request's ``1 + d_i`` positions in order.
            requests: the ``B`` requests (their ``sampling_params`` and output lengths).
            drafts: ``B`` lists of draft ids (``d_i`` each, ``d_i >= 1``).
            failed: if given, rows whose logits are degenerate are recorded there
                (row -> detail) and get no tokens.

        Returns: ``B`` lists of ``a_i + 1`` token ids (empty for a failed row). One
        device-to-host copy.
        """
        b = len(requests)
        vocab = logits.shape[-1]
        dev = logits.device
        lens = np.fromiter((len(d) for d in drafts), dtype=np.int64, count=b)
        k = int(lens.max())
        k1 = k + 1
        # [B, k+1] gather of each row's positions (pads repeat the row's last position).
        starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
        pos = np.minimum(np.arange(k1)[None, :], lens[:, None]) + starts[:, None]
        draft_ids = np.full((b, k), -1, dtype=np.int64)
        for i, d in enumerate(drafts):
            draft_ids[i, : len(d)] = d
        params = [r.sampling_params or SamplingParams() for r in requests]
        greedy = np.array([p.is_greedy for p in params])
        temp = np.array([1.0 if p.is_greedy else p.temperature for p in params], np.float32)
        top_k = np.array([vocab if p.top_k <= 0 else min(p.top_k, vocab) for p in params], np.int64)
        top_p = np.array([p.top_p for p in params], np.float32)
        min_p = np.array([p.min_p for p in params], np.float32)
        offsets = np.array([r.num_output_tokens for r in requests], np.int64)
        # Two host-to-device copies: every int64 input in one buffer, every float32 in another.
        ints = (pos, draft_ids, greedy, top_k, self._seeds(requests), offsets, lens)
        flat = torch.from_numpy(np.concatenate([np.ravel(a).astype(np.int64) for a in ints]))
        flat = flat.to(dev, non_blocking=True)
        floats = torch.from_numpy(np.concatenate([temp, top_p, min_p])).to(dev, non_blocking=True)
        t, at = {}, 0
        names = ("pos", "draft", "greedy", "top_k", "seed", "offset", "n")
        for name, a in zip(names, ints, strict=True):
            t[name] = flat[at : at + a.size].view(a.shape)
            at += a.size
        x = logits[t["pos"]].float().reshape(b * k1, vocab)  # [B (k+1), V]
        row_max, flags = row_max_and_flags(x)
        target = x.argmax(dim=-1)  # greedy rows: the argmax of the raw logits (lowest id)
        if not greedy.all():
            rep = lambda v: v.repeat_interleave(k1)  # noqa: E731 - per position of each row
            temps = rep(floats[:b])
            z = (x - row_max.unsqueeze(-1)) / temps.unsqueeze(-1)
            probs = torch.softmax(torch.where((flags != 0).unsqueeze(-1), 0.0, z), dim=-1)
            w = filter_weights(
                probs, rep(t["top_k"]).to(torch.int32), rep(floats[b : 2 * b]), rep(floats[2 * b :])
            )
            # position j of a row draws the sampler's number for output index offset + j
            offs = (t["offset"][:, None] + torch.arange(k1, device=dev)).reshape(-1)
            drawn = draw_inverse_cdf(w, rep(t["seed"]), offs)
            target = torch.where(rep(t["greedy"].bool()), target, drawn)
        out, num_acc = greedy_verify(t["draft"], target.view(b, k1), t["n"].to(torch.int32))
        bad = flags.view(b, k1)
        host = (
            torch.cat([out, num_acc[:, None].to(out.dtype), bad.amax(dim=1, keepdim=True)], dim=1)
            .cpu()
            .numpy()
        )
        tokens = []
        for i, row in enumerate(host):
            if row[-1] and failed is not None:
                failed[i] = FAILURE_DETAILS[int(row[-1])]
                tokens.append([])
            else:
                tokens.append(row[: int(row[-2]) + 1].tolist())
        return tokens
