"""A speculative pipeline with a proposer of your own, plugged into the runtime's verifier.

In the engine, any ``spec_decode.Proposer`` goes in ``speculative_method``: each step the engine
asks it for drafts, verifies them losslessly in one pass (greedy rows: the longest prefix
matching the argmax) and rolls rejected positions back, so greedy output is exactly plain
decoding in fewer steps. On their own, ``SpecVerifier`` turns logits from any source into the
tokens each request emits, and ``rejection_sample`` verifies drafts against distributions you
computed. ``dummy:tiny`` (random weights, whose greedy output loops); CPU, ~2 s.
"""

from __future__ import annotations

import torch

from layerzero_serve import SamplingParams
from layerzero_serve.engine import Engine
from layerzero_serve.spec_decode import Proposer, draw_randoms, rejection_sample
from layerzero_serve.spec_decode.verifier import SpecVerifier
from layerzero_serve.types import Request

PROMPTS = [[5, 6, 7, 8] * 5, [100, 200, 300] * 6, [13] * 12, [1, 2, 3]]
MAX_TOKENS, K = 48, 4


class FollowerProposer(Proposer):
    """Your proposer: the current token is followed by what followed its last earlier occurrence;
    chain that guess up to ``k`` times (a bigram table learned from the request's own context)."""

    name = "follower"

    def propose(self, requests_tokens, k):
        drafts = []
        for tokens in requests_tokens:
            tokens = list(tokens)
            follower = dict(zip(tokens[:-1], tokens[1:], strict=True))  # the last one wins
            guess, cur = [], tokens[-1]
            while len(guess) < k and cur in follower:
                cur = follower[cur]
                guess.append(cur)
            drafts.append(guess)
        return drafts


def generate(engine: Engine, params: SamplingParams) -> list[list[int]]:
    ids = [engine.add_request(p, params) for p in PROMPTS]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return [got[i] for i in ids]


def verifier_on_toy_logits() -> dict:
    """``SpecVerifier`` on toy logits: a bigram table ``[V, V]`` (row t favours t + 1)."""
    vocab = 16
    noise = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 0.5
    table = noise + 4.0 * torch.eye(vocab).roll(1, dims=1)  # logits of the token after t
    reqs = [
        Request("greedy", [1, 2, 3, 1, 2], 8, sampling_params=SamplingParams(temperature=0)),
        Request("sampled", [4, 5, 6, 4, 5], 8, sampling_params=SamplingParams(seed=3)),
    ]
    drafts = FollowerProposer().propose([r.all_token_ids for r in reqs], K)
    rows = []  # each request's 1 + d positions: its last token, then its drafts
    for r, d in zip(reqs, drafts, strict=True):
        rows += [r.all_token_ids[-1], *d]
    logits = table[torch.tensor(rows)]  # float32 [sum(1 + d_i), V]
    tokens = SpecVerifier(rejection_sample, seed=0).verify(logits, reqs, drafts)
    contexts = [r.all_token_ids for r in reqs]
    return {"table": table, "contexts": contexts, "drafts": drafts, "tokens": tokens}


def rejection_on_toy_distributions(num_rows: int = 20000) -> dict:
    """``rejection_sample`` with your draft ``q`` against a target ``p``: the first emitted token
    follows ``p`` whatever ``q`` is; position 0 accepts with probability ``sum(min(p, q))``."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])  # the target, at every position
    q = torch.tensor([0.10, 0.10, 0.50, 0.10, 0.10, 0.10])  # your draft model: quite wrong
    k, vocab = 2, p.numel()
    draft_ids = torch.multinomial(q, num_rows * k, replacement=True, generator=g).view(-1, k)
    draft_probs = q.expand(num_rows, k, vocab).contiguous()  # float32 [B, k, V]
    target_probs = p.expand(num_rows, k + 1, vocab).contiguous()  # float32 [B, k+1, V]
    uniforms, noise = draw_randoms(num_rows, k, vocab, generator=g)
    num_drafts = torch.full((num_rows,), k, dtype=torch.int32)
    out, num_accepted = rejection_sample(
        draft_ids, draft_probs, target_probs, uniforms, noise, num_drafts
    )  # out int64 [B, k+1] (-1 padded), num_accepted int32 [B]
    counts = torch.bincount(out[:, 0], minlength=vocab).tolist()
    accepted = int((num_accepted >= 1).sum())
    return {"p": p.tolist(), "q": q.tolist(), "first_token_counts": counts,
            "accepted_first": accepted, "num_rows": num_rows}  # fmt: skip


def main() -> dict:
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    engine = Engine(model="dummy:tiny", device="cpu", speculative_method=FollowerProposer(),
                    num_speculative_tokens=K, adaptive_speculation=False)  # fmt: skip
    tokens = generate(engine, greedy)  # adaptive_speculation=True: k per step from acceptance
    stats = engine.stats()
    s = stats["speculative"]
    print(f"{s['method']}: {s['accepted_tokens']}/{s['drafted_tokens']} drafts accepted, "
          f"{stats['steps']} steps for {MAX_TOKENS} tokens per request, per position "
          f"{[round(a, 2) for a in s['acceptance_rate_per_position']]}")  # fmt: skip
    toy, rs = verifier_on_toy_logits(), rejection_on_toy_distributions()
    print("SpecVerifier on toy logits: drafts", toy["drafts"], "-> emitted", toy["tokens"])
    freq = [round(c / rs["num_rows"], 3) for c in rs["first_token_counts"]]
    print(f"rejection_sample: first-token frequencies {freq}, target {rs['p']}")
    res = {"prompts": PROMPTS, "max_tokens": MAX_TOKENS, "tokens": tokens, "steps": stats["steps"]}
    return {**res, "speculative": s, "verifier": toy, "rejection": rs}


if __name__ == "__main__":
    main()
