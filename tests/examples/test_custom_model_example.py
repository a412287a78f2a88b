"""examples/custom_model.py: a user's decoder on the runtime's paged attention, KV cache and
scheduler gives, for a batch of prompts of different lengths (none a multiple of the block
size, prefill chunked), exactly the greedy tokens of the same weights run densely without any
cache: the whole prefix recomputed each step with plain causal attention (the oracle below).
On a GPU, every CUDA-graph decode replay equals the bucket's kernels run eagerly, bitwise."""

from __future__ import annotations

import pytest
import torch
from example_loader import load_example


def dense_attention(layer, q, k, v, meta):
    """Causal softmax attention over one whole sequence: q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``
    -> ``[T, Hq, D]``; query head h reads KV head ``h // (Hq // Hkv)``."""
    t, hq, d = q.shape
    k, v = (x.repeat_interleave(hq // x.shape[1], dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) * d**-0.5
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def dense_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    """No KV cache, no scheduler: recompute the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            hidden = model(torch.tensor(ids), torch.arange(len(ids)), dense_attention, None)
            ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return ids[len(prompt) :]


def test_paged_greedy_equals_dense_recompute():
    mod = load_example("custom_model")
    res = mod.main()
    lens = [len(p) for p in mod.PROMPTS]
    assert len(set(lens)) == len(lens) and all(n % mod.BLOCK for n in lens)
    model = mod.TinyDecoder().eval()
    expected = [dense_greedy(model, p, n) for p, n in zip(mod.PROMPTS, mod.MAX_NEW, strict=True)]
    assert res["tokens"] == expected
    assert {1, 2, 3, 4} <= set(res["decode_batches"])  # the batch shrank as requests finished
    assert all(f"{op}=" in res["kernels"] for op in ("decode", "prefill", "kv_write"))

    mod.BLOCK = 7  # another block size, again dividing no length: the same tokens
    assert all(n % mod.BLOCK for n in lens)
    assert mod.generate(torch.device("cpu"))[0] == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_replays_equal_eager_bitwise():
    mod = load_example("custom_model")
    res = mod.main()
    assert res["replays"] and res["replays_bitwise_equal"]
    assert {bucket for bucket, _, _ in res["replays"]} == set(mod.BUCKETS)
    assert [len(t) for t in res["gpu_tokens"]] == list(mod.MAX_NEW)
