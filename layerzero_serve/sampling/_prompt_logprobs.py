"""Prompt logprobs (``SamplingParams.prompt_logprobs``) and the runner's per-step result type.

The hidden state at position ``p`` predicts the token at ``p + 1``: for a prefill chunk covering
positions ``[start, start + n)`` of a request with a ``P``-token prompt, the positions
``p < P - 1`` of the chunk give the logprobs of prompt tokens ``p + 1`` (log-softmax of the
model's raw logits, float32). All rows of a step go through one ``compute_logits``, one
log-softmax and one device-to-host copy; steps without such rows pay nothing. Runs eagerly (a
prefill step), never inside a graph.
"""

from __future__ import annotations

import numpy as np
import torch

from layerzero_serve.types import SchedulerOutput, TokenLogprob


def any_prompt_logprobs(requests) -> bool:
    for r in requests:
        p = r.sampling_params
        if p is not None and p.prompt_logprobs is not None:
            return True
    return False


def prompt_logprobs(
    model, hidden: torch.Tensor, out: SchedulerOutput, query_start_loc: list[int]
) -> dict[int, list[tuple[int, TokenLogprob]]]:
    """Row -> [(position of the prompt token, its TokenLogprob)] for the rows of ``out`` that
    asked for prompt logprobs and compute prompt positions this step.

    Args:
        model: has ``compute_logits(hidden [N, H]) -> float32 [N, V]``.
        hidden: ``[T, H]`` hidden states of the step's packed tokens.
        out: the step's schedule; ``query_start_loc`` its host CSR offsets (``[rows + 1]``).
    """
    index: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    spans: list[tuple[int, int, int, int]] = []  # row, first target position, count, top-n
    rows = zip(out.requests, out.starts, out.num_scheduled, strict=True)
    for row, (req, start, n) in enumerate(rows):
        p = req.sampling_params
        if p is None or p.prompt_logprobs is None:
            continue
        prompt_len = req.num_prompt_tokens
        stop = min(start + n, prompt_len - 1)  # positions whose next token is a prompt token
        if stop <= start:
            continue
        count = stop - start
        base = query_start_loc[row]
        index.append(np.arange(base, base + count))
        targets.append(np.asarray(req.prompt_token_ids[start + 1 : stop + 1], np.int64))
        spans.append((row, start + 1, count, p.prompt_logprobs))
    if not spans:
        return {}
    device = hidden.device
    idx = torch.from_numpy(np.concatenate(index)).to(device)
    tgt = torch.from_numpy(np.concatenate(targets)).to(device)
    lp = torch.log_softmax(model.compute_logits(hidden[idx]).float(), dim=-1)
    tok_lp = lp.gather(1, tgt.unsqueeze(-1))
    rank = (lp > tok_lp).sum(dim=-1, keepdim=True) + 1
    n_top = max(s[3] for s in spans)
    cols = [tgt.unsqueeze(-1), tok_lp, rank]
    if n_top > 0:
        top_lp, top_ids = lp.topk(n_top, dim=-1)
        cols += [top_ids, top_lp]
    arr = torch.cat([c.to(torch.float64) for c in cols], dim=1).cpu().numpy()
    result: dict[int, list[tuple[int, TokenLogprob]]] = {}
    pos = 0
    for row, first, count, n in spans:
        entries = []
        for j in range(count):
            a = arr[pos + j]
            entries.append(
                (
                    first + j,
                    TokenLogprob(
                        int(a[0]),
                        float(a[1]),
                        int(a[2]),
                        a[3 : 3 + n].astype(np.int64).tolist(),
                        a[3 + n_top : 3 + n_top + n].tolist(),
                    ),
                )
            )
        result[row] = entries
        pos += count
    return result
